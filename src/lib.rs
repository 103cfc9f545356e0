//! DataVault: keeps a Raspberry Pi application's data alive.
//!
//! The library knows nothing of terminals: the `datavault` binary (src/main.rs, src/cli.rs,
//! src/commands/) parses arguments, calls these modules and renders their results.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod retention;
