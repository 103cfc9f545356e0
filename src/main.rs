//! The `datavault` binary: parse, call the library, render, map errors to exit codes.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod ui;

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(cli::main())
}
