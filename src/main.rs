//! The `datavault` binary: parse, call the library, render, map errors to exit codes.
#![forbid(unsafe_code)]

mod cli;
mod commands;

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(cli::main())
}
