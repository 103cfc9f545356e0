//! One file per command: each calls its library operation and renders the result for people
//! (or `--json` for machines) through [`crate::ui`]. Nothing here decides anything the
//! library could.

pub mod agent;
pub mod audit;
pub mod backup;
pub mod completions;
pub mod demo;
pub mod doctor;
pub mod drill;
pub mod init;
pub mod list;
pub mod notify;
pub mod offsite;
pub mod prune;
pub mod restore;
pub mod status;
pub mod verify;

use datavault::retention::ArchiveKind;

pub fn kind_name(k: ArchiveKind) -> &'static str {
    match k {
        ArchiveKind::Backup => "backup",
        ArchiveKind::PreRestore => "pre-restore",
    }
}
