//! Command-line definition and dispatch. Kept thin: every command's work is in the library
//! (`datavault::ops`), its rendering in `commands/`, the output plumbing in `ui`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use datavault::config::{self, Settings};
use datavault::error::{exit, Result};
use datavault::ops::{self, Env};

use crate::commands;
use crate::ui::{self, Ui};

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   unexpected failure (a stop/start command failed, an I/O error we did not foresee)
  2   usage or configuration error (bad config, missing or unprotected key file)
  3   target not ready (USB drive missing, not mounted, not LUKS, not enough space, full;
      no room to extract a drill or restore)
  4   integrity failure (damaged, truncated or tampered archive, wrong key, unsafe archive
      content, failed drill)
  5   source unreadable (database missing or damaged, uploads unreadable)
  75  another datavault run holds the lock (try again later)

Offsite (datavault offsite ...): 3 the server is unreachable, DNS or TLS fails, a request
timed out, the bucket is missing or full, the clock is too far off (RequestTimeTooSkewed:
a Pi without an RTC needs NTP synced first); 2 wrong or insufficient credentials
(SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied) or a bad [offsite] value;
4 a remote object conflicts with the drive's, or a file on the drive is damaged.

Config: --config, else $DATAVAULT_CONFIG, else /etc/datavault/datavault.toml.
Try it without a Pi: `datavault demo`.";

#[derive(Parser)]
#[command(
    name = "datavault",
    version,
    about = "Keeps a Raspberry Pi application's data alive: encrypted, verified backups of a live SQLite database and its uploads on a LUKS USB drive, drills that prove they restore, and safe restores.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Config file (default: $DATAVAULT_CONFIG, else /etc/datavault/datavault.toml)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON on stdout, for every command that reports something (all but agent, completions)
    #[arg(long, global = true)]
    pub json: bool,
    /// More log detail (-v debug, -vv trace)
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only warnings and errors; no progress bar
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Trigger {
    Manual,
    Timer,
    Button,
    Boot,
}

impl From<Trigger> for datavault::ops::Trigger {
    fn from(t: Trigger) -> Self {
        match t {
            Trigger::Manual => datavault::ops::Trigger::Manual,
            Trigger::Timer => datavault::ops::Trigger::Timer,
            Trigger::Button => datavault::ops::Trigger::Button,
            Trigger::Boot => datavault::ops::Trigger::Boot,
        }
    }
}

/// The shells `datavault completions` writes for.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write a commented config template (and with --keygen, a new key pair)
    Init {
        /// Also create an age identity file (mode 0600) beside the config and put its public key in it
        #[arg(long)]
        keygen: bool,
    },
    /// Create a new age identity (private key) file and print its public key (age1...)
    Keygen {
        /// Where to write the identity; refuses to overwrite
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
    },
    /// Back up the database and the uploads to the target now, then prune
    Backup {
        /// What started this backup (recorded in the manifest and the catalog)
        #[arg(long, value_enum, default_value = "manual")]
        trigger: Trigger,
        /// A note stored with the archive (e.g. "before upgrading the app")
        #[arg(long)]
        comment: Option<String>,
    },
    /// List the archives on the target (or, with --offsite, in the bucket), newest first
    List {
        /// The archives in the offsite copy ([offsite]) instead of on the drive
        #[arg(long)]
        offsite: bool,
    },
    /// Check archives against their manifests (checksum; --deep also decrypts every entry)
    #[command(
        after_help = "With --offsite, the archives in the bucket: without --deep nothing is downloaded (no key needed): each object's size and the SHA-256 the push recorded while sending it are checked against its manifest; --deep downloads, decrypts and checks everything, streaming."
    )]
    Verify {
        /// Archive name (default: the newest backup)
        archive: Option<String>,
        /// Every archive on the target
        #[arg(long, conflicts_with = "archive")]
        all: bool,
        /// Also decrypt and check every file against the inner manifest (needs the identity)
        #[arg(long)]
        deep: bool,
        /// The archives in the offsite copy ([offsite]) instead of on the drive
        #[arg(long)]
        offsite: bool,
    },
    /// Prove an archive restores: extract to scratch (every byte checked against its hash), integrity_check, run the SQL checks
    Drill {
        /// Archive name (default: the newest backup)
        archive: Option<String>,
        /// What started this drill. `timer` (the weekly drill) skips, exit 0, when the newest
        /// backup already passed a drill in the last 24 hours (the boot drill just before it)
        #[arg(long, value_enum, default_value = "manual")]
        trigger: Trigger,
        /// Drill an archive of the offsite copy (downloaded, streaming); without the drive and
        /// drill.scratch_dir it extracts into the state folder
        #[arg(long)]
        offsite: bool,
    },
    /// Restore an archive: into an empty folder (--to) or in place of the live data
    #[command(
        after_help = "In place, datavault verifies the archive fully, runs the stop command, takes a PRE-RESTORE \
safety backup of the current data (after the stop, so what the app wrote while stopping is in it), swaps the data \
in atomically, runs the start command, and puts the previous data back if anything fails. Without --yes it asks \
for confirmation on a terminal and refuses otherwise."
    )]
    Restore {
        /// Archive name (default: the newest complete backup)
        archive: Option<String>,
        /// Restore into this empty (or new) folder instead of in place
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        /// Do not ask for confirmation before replacing the live data
        #[arg(long)]
        yes: bool,
        /// Restore from the offsite copy ([offsite]): no drive needed with --to, or in place
        /// on a Pi without live data (docs/offsite.md, "Restore from offsite")
        #[arg(long)]
        offsite: bool,
        /// With --offsite, in place, without the drive: replace the live data without saving it first
        #[arg(long, requires = "offsite", conflicts_with = "to")]
        no_safety_copy: bool,
        /// With --to, snapshots only: leave out a file whose content is damaged on the drive
        /// (no copy reads) and restore every other one; names each file left out, exits 4
        #[arg(long, requires = "to")]
        skip_damaged: bool,
    },
    /// Apply the retention policy (delete archives no rule keeps)
    Prune {
        /// Only show what would be deleted
        #[arg(long)]
        dry_run: bool,
    },
    /// Last backup, last drill, target state, and what to do if something is wrong
    Status,
    /// The audit catalog: recent runs, events and archives
    Audit {
        /// How many runs and events to show
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Self-test: config, database, uploads, target, keys, clock, GPIO, lock, last backup and drill
    #[command(
        after_help = "Exits non-zero when something would make the next backup fail: 2 config, paths \
or state folder, 3 target, 5 source, 1 catalog unreadable. Warnings (no identity, overdue backup, failed drill, \
odd clock, no notification channel, drive nearly full) are listed but do not fail."
    )]
    Doctor,
    /// The appliance daemon: status LED, push button, SIGUSR1 backup, SIGHUP reload (run by systemd)
    #[command(after_help = "Short press: backup now. Long press (gpio.long_press_ms): drill now. Presses \
during a run are acknowledged by three quick flashes. SIGTERM/SIGINT stop cleanly (a running backup is \
cancelled and removes its partial file); SIGHUP reloads the config (a bad one is refused and the old one \
kept); SIGUSR1 starts a backup. Speaks systemd's notify protocol when NOTIFY_SOCKET is set.")]
    Agent,
    /// Copy the drive's backups to S3-compatible storage (push), or prune that copy (prune)
    #[command(subcommand)]
    Offsite(OffsiteCommand),
    /// Tell the owner: record what changed, then send pending pings, ntfy posts and e-mails
    #[command(after_help = "Run by datavault-notify.service after every backup and drill and by its timer \
(it has the network; the backup and drill units do not, they only record). Each condition (backup failed \
or overdue, drill failed or overdue, drive missing or nearly full) is told once when it starts and once when \
it ends; a restore is told once. What cannot be sent stays pending and is retried at the next run (given up \
after 7 days). Never takes the backups' lock. Configure it in [notify] (README, Notifications).")]
    Notify {
        /// Only send the healthchecks start ping, now (datavault-ping-start.service, before each backup)
        #[arg(long, conflicts_with_all = ["test", "list"])]
        start: bool,
        /// Send a test message through ntfy and e-mail now
        #[arg(long, conflicts_with = "list")]
        test: bool,
        /// Show the recent notifications and their deliveries; send nothing
        #[arg(long)]
        list: bool,
    },
    /// Print shell completions (bash, zsh or fish) to stdout
    #[command(after_help = "The .deb and scripts/install.sh install them; by hand: \
`datavault completions bash | sudo tee /usr/share/bash-completion/completions/datavault`.")]
    Completions {
        /// Which shell
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff) to stdout: used by the packaging scripts
    #[command(hide = true)]
    Man,
    /// Run the whole job on a built-in example app in a temporary folder (no Pi, no setup)
    Demo {
        /// Keep the demo folder instead of deleting it at the end
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand)]
pub enum OffsiteCommand {
    /// Upload whatever the bucket lacks: data first, the manifest that makes a backup visible last
    #[command(
        after_help = "Resumable: a push cut off (kill, dropped connection) leaves nothing half-visible; the \
next one aborts the unfinished upload and sends only what is missing. Never overwrites a remote object: a \
put-only credential (no DeleteObject) is enough and is the recommended setup (docs/offsite.md). Archives \
and snapshots that [offsite.retention] would not keep are not sent; a snapshot travels with the packs \
holding the chunks the bucket lacks, nothing more. Takes its own lock (offsite.lock), never the backup's. \
Exit 3: server unreachable, DNS, TLS, timeout, bucket missing or full, clock skew; 2: credentials or \
[offsite] config; 4: a remote object conflicts, or a file on the drive is damaged (not sent)."
    )]
    Push {
        /// Only list what would be uploaded
        #[arg(long)]
        dry_run: bool,
        /// What started this push (recorded in the catalog)
        #[arg(long, value_enum, default_value = "manual")]
        trigger: Trigger,
    },
    /// Apply [offsite.retention] to the bucket: run it OFF the Pi, with a delete-capable credential
    #[command(after_help = "Deletes manifests first, then their archives; archives without a manifest and \
unfinished uploads older than a day; merges the upload ledger. With the Pi's put-only credential it fails \
with exit 2 (AccessDenied), by design: a thief or ransomware on the Pi cannot delete the offsite copy. \
Snapshots (store/): forgets those the policy drops (manifest first), then deletes or repacks the packs no \
snapshot left in the bucket needs (no key needed); the packs wait while a push is under way (markers in \
store/locks/). Never expire store/ with a bucket lifecycle rule.")]
    Prune {
        /// Only show what would be deleted
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn main() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => exit::SUCCESS,
                _ => exit::USAGE,
            };
        }
    };
    init_logging(&cli);
    let ui = Ui { json: cli.json, quiet: cli.quiet };
    match dispatch(&cli, &ui) {
        Ok(code) => code,
        // The reader of our stdout went away (`| head`): it has what it wanted.
        Err(e) if e.is_broken_pipe() => exit::SUCCESS,
        Err(e) => {
            ui::report(&e);
            e.exit_code()
        }
    }
}

fn init_logging(cli: &Cli) {
    use simplelog::{ConfigBuilder, LevelFilter, WriteLogger};
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => LevelFilter::Warn,
        (false, 0) => LevelFilter::Info,
        (false, 1) => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let mut b = ConfigBuilder::new();
    // journald adds timestamps; a terminal gets them.
    if !std::io::stderr().is_terminal() {
        b.set_time_level(LevelFilter::Off);
    }
    if cli.verbose < 2 {
        // rust-s3's own lines ("Retrying safe S3 request...") say less than ours; -vv shows them.
        b.add_filter_ignore_str("s3");
    }
    // The HTTP client logs request lines at debug level, and a ping URL or an ntfy topic in
    // them is a secret (#15): its lines are never shown; ours name the host only.
    b.add_filter_ignore_str("attohttpc");
    b.set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off);
    let _ = WriteLogger::init(level, b.build(), ui::PrintableStderr);
}

fn load(cli: &Cli) -> Result<Settings> {
    Settings::load(&config::resolve_path(cli.config.as_deref()))
}

fn env(cli: &Cli, ui: &Ui) -> Result<Env> {
    Ok(Env::new(load(cli)?, ui.progress()))
}

fn dispatch(cli: &Cli, ui: &Ui) -> Result<u8> {
    let config_path = || config::resolve_path(cli.config.as_deref());
    match &cli.command {
        Command::Init { keygen } => commands::init::init(&config_path(), *keygen, ui),
        Command::Keygen { output } => commands::init::keygen(output, ui),
        Command::Backup { trigger, comment } => {
            commands::backup::run(&env(cli, ui)?, (*trigger).into(), comment.clone(), ui)
        }
        Command::List { offsite } => commands::list::run(&env(cli, ui)?.with_offsite(*offsite), ui),
        Command::Verify { archive, all, deep, offsite } => {
            commands::verify::run(&env(cli, ui)?.with_offsite(*offsite), archive.as_deref(), *all, *deep, ui)
        }
        Command::Drill { archive, trigger, offsite } => commands::drill::run(
            &env(cli, ui)?.with_offsite(*offsite),
            archive.as_deref(),
            (*trigger).into(),
            ui,
        ),
        Command::Restore { archive, to, yes, offsite, no_safety_copy, skip_damaged } => {
            commands::restore::run(
                &env(cli, ui)?.with_offsite(*offsite),
                archive.as_deref(),
                to.as_deref(),
                *yes,
                if *no_safety_copy {
                    ops::restore::SafetyCopy::Skip
                } else {
                    ops::restore::SafetyCopy::Required
                },
                *skip_damaged,
                ui,
            )
        }
        Command::Prune { dry_run } => commands::prune::run(&env(cli, ui)?, *dry_run, ui),
        Command::Status => commands::status::run(&env(cli, ui)?, ui),
        Command::Audit { limit } => commands::audit::run(&env(cli, ui)?, *limit, ui),
        Command::Offsite(OffsiteCommand::Push { dry_run, trigger }) => {
            commands::offsite::push(&env(cli, ui)?, (*trigger).into(), *dry_run, ui)
        }
        Command::Offsite(OffsiteCommand::Prune { dry_run }) => {
            commands::offsite::prune(&env(cli, ui)?, *dry_run, ui)
        }
        Command::Demo { keep } => commands::demo::run(*keep, ui),
        Command::Doctor => commands::doctor::run(&config_path(), ui),
        Command::Agent => commands::agent::run(&config_path()),
        Command::Notify { start, test, list } => {
            commands::notify::run(&env(cli, ui)?, *start, *test, *list, ui)
        }
        Command::Completions { shell } => commands::completions::completions(*shell),
        Command::Man => commands::completions::man(),
    }
}
