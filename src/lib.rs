//! DataVault: keeps a Raspberry Pi application's data alive.
//!
//! The library knows nothing of terminals: the `datavault` binary (src/main.rs, src/cli.rs,
//! src/commands/) parses arguments, calls these modules and renders their results.
#![forbid(unsafe_code)]

pub mod agent;
pub mod alerts;
pub mod archive;
pub mod catalog;
pub mod config;
pub mod crashpoint;
pub mod demo;
pub mod error;
pub mod fsutil;
pub mod hardware;
pub mod keys;
pub mod lock;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod offsite;
pub mod ops;
pub mod pipe;
pub mod progress;
pub mod retention;
pub mod snapshot;
pub mod store;
pub mod target;
pub mod tree;
