//! `datavault completions SHELL` and the hidden `datavault man`: generated from the clap
//! definition itself, so they can never disagree with `--help`. The packaging scripts
//! (scripts/build-pi.sh, scripts/install.sh) run these to install them.

use clap::CommandFactory;

use datavault::error::{exit, Error, Result};

use crate::cli::{Cli, Shell};

pub fn completions(shell: Shell) -> Result<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "datavault", &mut out);
    crate::ui::out(&String::from_utf8_lossy(&out))?;
    Ok(exit::SUCCESS)
}

pub fn man() -> Result<u8> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| Error::io("rendering the man page", e))?;
    crate::ui::out(&String::from_utf8_lossy(&out))?;
    Ok(exit::SUCCESS)
}
