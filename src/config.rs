//! The configuration file: parsed once, validated once, into [`Settings`].
//!
//! The TOML is read into `Raw*` structs that keep every value's position (`Spanned`), so that
//! a bad value is reported as `config PATH: line N: key: what is wrong; how to fix`. Nothing
//! outside this module sees the raw form. Unknown keys are errors: a typo such as
//! `require_lusk = true` must not silently turn a safety check off.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};
use crate::retention::RetentionPolicy;

/// The commented template written by `datavault init`.
pub const TEMPLATE: &str = include_str!("../config/datavault.example.toml");
/// Where the config is looked for when neither `--config` nor `$DATAVAULT_CONFIG` is set.
pub const DEFAULT_PATH: &str = "/etc/datavault/datavault.toml";

#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    pub source: SourceSettings,
    pub target: TargetSettings,
    pub encryption: EncryptionSettings,
    pub compression: CompressionSettings,
    pub retention: RetentionPolicy,
    pub service: Option<ServiceSettings>,
    pub drill: DrillSettings,
    pub state: StateSettings,
    pub gpio: GpioSettings,
    pub agent: AgentSettings,
    /// `[offsite]` (#10): the S3 copy; `None` when the section is absent.
    pub offsite: Option<OffsiteSettings>,
    /// `[store] format` (#9): what a backup writes.
    pub store_format: StoreFormat,
    /// `[notify]` (#15): pings, ntfy, e-mail; every channel off when the section is absent.
    pub notify: NotifySettings,
}

/// What `backup` writes to the drive (#9). Either way, both kinds already on the drive are
/// listed, verified, drilled, restored and pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFormat {
    /// One self-contained `.tar.zst.age` file per backup.
    Archives,
    /// Deduplicated snapshots under `store/`: a backup adds only what changed.
    Snapshots,
}

/// A config without `[store] format` keeps archives: an upgrade never changes what an existing
/// install writes (nor its emergency path) unasked. `datavault init`'s template sets snapshots.
pub const DEFAULT_STORE_FORMAT: StoreFormat = StoreFormat::Archives;

/// The status LED and the push button (`datavault agent`). All off by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpioSettings {
    /// BCM number of an external LED's pin.
    pub led_pin: Option<u8>,
    /// Drive the Pi's onboard activity LED (/sys/class/leds/ACT or led0).
    pub act_led: bool,
    /// BCM number of the button's pin (to ground; internal pull-up, active low).
    pub button_pin: Option<u8>,
    pub debounce: std::time::Duration,
    pub long_press: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Without a successful backup for this long, the LED says "overdue".
    pub max_age_hours: u32,
}

#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub database: PathBuf,
    pub uploads: Option<PathBuf>,
    /// `PRAGMA quick_check` the snapshot in its read transaction before copying it (default
    /// true): a damaged live database is said at once, not at the next drill.
    pub check_database: bool,
}

#[derive(Debug, Clone)]
pub struct TargetSettings {
    pub path: PathBuf,
    pub require_mountpoint: bool,
    pub require_luks: bool,
    /// If set, the drive must carry a `.datavault-target` marker with this id, so a
    /// different USB stick plugged in by mistake is never written to.
    pub marker_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EncryptionSettings {
    pub recipients: Vec<age::x25519::Recipient>,
    pub identity: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct CompressionSettings {
    pub level: i32,
    /// Archives: zstd workers (>= 1; default 1).
    pub threads: u32,
    /// Snapshots: sealer threads, each compressing and encrypting into a pack of its own
    /// (>= 1): `threads` when the config sets it, else one per core, at most 4.
    pub snapshot_workers: usize,
}

#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub stop_command: String,
    pub start_command: String,
    /// A stop or start command still running after this long is killed and counts as failed:
    /// a hung stop must not hold the run lock (and the app's data) forever.
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct DrillSettings {
    pub checks: Vec<String>,
    pub scratch_dir: Option<PathBuf>,
    /// Without a drill for this long (counted from the first backup), drills are overdue (#15).
    pub max_age_days: u32,
}

#[derive(Debug, Clone)]
pub struct StateSettings {
    pub dir: PathBuf,
}

impl StateSettings {
    pub fn catalog_path(&self) -> PathBuf {
        self.dir.join("catalog.db")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("datavault.lock")
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join("datavault.prom")
    }
    pub fn restore_journal_path(&self) -> PathBuf {
        self.dir.join("restore-journal.json")
    }
}

impl DrillSettings {
    pub fn scratch_dir(&self, target: &TargetSettings) -> PathBuf {
        self.scratch_dir.clone().unwrap_or_else(|| target.path.join(".datavault-drill"))
    }
}

/// The dotted key (`section.key`) whose value starts on the line holding byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let section = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

// ---- raw, position-keeping form -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Spanned<RawSource>,
    target: Spanned<RawTarget>,
    encryption: Spanned<RawEncryption>,
    compression: Option<RawCompression>,
    retention: Option<RawRetention>,
    service: Option<RawService>,
    drill: Option<RawDrill>,
    state: Option<RawState>,
    gpio: Option<RawGpio>,
    agent: Option<RawAgent>,
    offsite: Option<RawOffsite>, // #10
    notify: Option<RawNotify>,   // #15
    store: Option<RawStore>,     // #9
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpio {
    led_pin: Option<Spanned<i64>>,
    act_led: Option<bool>,
    button_pin: Option<Spanned<i64>>,
    debounce_ms: Option<Spanned<i64>>,
    long_press_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    max_age_hours: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    database: Spanned<String>,
    uploads: Option<Spanned<String>>,
    check_database: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    path: Spanned<String>,
    require_mountpoint: Option<bool>,
    require_luks: Option<bool>,
    marker_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    recipients: Spanned<Vec<Spanned<String>>>,
    identity: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompression {
    level: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_last: Option<Spanned<i64>>,
    keep_daily: Option<Spanned<i64>>,
    keep_weekly: Option<Spanned<i64>>,
    keep_monthly: Option<Spanned<i64>>,
    keep_pre_restore: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    stop_command: Spanned<String>,
    start_command: Spanned<String>,
    timeout_seconds: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrill {
    checks: Option<Vec<Spanned<String>>>,
    scratch_dir: Option<Spanned<String>>,
    max_age_days: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Spanned<String>,
}

/// Where the config file is: `--config`, else `$DATAVAULT_CONFIG`, else the default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("DATAVAULT_CONFIG") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

impl Settings {
    pub fn load(path: &Path) -> Result<Settings> {
        let text = match crate::fsutil::read_regular(path, 1 << 20) {
            Ok(bytes) => String::from_utf8(bytes)
                .map_err(|_| Error::config(path, "is not UTF-8 text; it should be a TOML file"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::config(
                    path,
                    "file not found; create it with `datavault init --keygen` or pass --config PATH",
                ))
            }
            Err(e) => return Err(Error::config(path, format!("cannot read it: {e}"))),
        };
        Settings::parse(path, &text)
    }

    /// Parse and validate: each section in its own function below, then the rules across
    /// sections (the paths' layout).
    pub fn parse(path: &Path, text: &str) -> Result<Settings> {
        let v = Validator { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| format!("line {}: ", v.line(s.start))).unwrap_or_default();
            // serde's type errors do not name the key: take it from the line (tests/config_fuzz.rs).
            let key =
                e.span().and_then(|s| key_at(text, s.start)).map(|k| format!("{k}: ")).unwrap_or_default();
            Error::config(path, format!("{line}{key}{}", e.message().trim().replace('\n', " ")))
        })?;
        let mut settings = Settings {
            path: path.to_path_buf(),
            source: v.source(raw.source.get_ref())?,
            target: v.target(raw.target.get_ref())?,
            encryption: v.encryption(raw.encryption.get_ref())?,
            compression: v.compression(raw.compression.as_ref())?,
            retention: v.retention(raw.retention.as_ref())?,
            service: raw.service.as_ref().map(|s| v.service(s)).transpose()?,
            drill: v.drill(raw.drill.as_ref())?,
            state: StateSettings {
                dir: match &raw.state {
                    None => PathBuf::from("/var/lib/datavault"),
                    Some(s) => v.abs_path("state.dir", &s.dir)?,
                },
            },
            gpio: v.gpio(raw.gpio.as_ref())?,
            agent: AgentSettings {
                max_age_hours: match raw.agent.as_ref().and_then(|a| a.max_age_hours.as_ref()) {
                    None => 26,
                    Some(h) => v.int_in("agent.max_age_hours", h, 1, 24 * 366)? as u32,
                },
            },
            offsite: None,
            store_format: match raw.store.as_ref().and_then(|s| s.format.as_ref()) {
                None => DEFAULT_STORE_FORMAT,
                Some(f) => match f.get_ref().trim() {
                    "archives" => StoreFormat::Archives,
                    "snapshots" => StoreFormat::Snapshots,
                    other => {
                        return Err(v.err(
                            "store.format",
                            f.span().start,
                            format!("{other:?} is not a store format; use \"snapshots\" or \"archives\""),
                        ))
                    }
                },
            },
            notify: v.notify(raw.notify.as_ref())?, // #15
        };
        settings.offsite =
            raw.offsite.as_ref().map(|o| parse_offsite(&v, o, &settings.retention)).transpose()?; // #10
        settings.layout().check().map_err(|m| Error::config(path, m))?;
        Ok(settings)
    }

    /// Where everything is, for the overlap rules.
    pub fn layout(&self) -> Layout {
        Layout {
            database: self.source.database.clone(),
            uploads: self.source.uploads.clone(),
            target: self.target.path.clone(),
            state: self.state.dir.clone(),
            scratch: self.drill.scratch_dir.clone(),
        }
    }
}

impl Validator<'_> {
    fn source(&self, raw: &RawSource) -> Result<SourceSettings> {
        let database = self.abs_path("source.database", &raw.database)?;
        let uploads = raw.uploads.as_ref().map(|u| self.abs_path("source.uploads", u)).transpose()?;
        if let Some(u) = &uploads {
            if u == &database || database.starts_with(u) {
                return Err(Error::config(
                    self.path,
                    "source.uploads contains source.database; point uploads at the folder of user files only",
                ));
            }
        }
        Ok(SourceSettings { database, uploads, check_database: raw.check_database.unwrap_or(true) })
    }

    fn target(&self, raw: &RawTarget) -> Result<TargetSettings> {
        Ok(TargetSettings {
            path: self.abs_path("target.path", &raw.path)?,
            require_mountpoint: raw.require_mountpoint.unwrap_or(true),
            require_luks: raw.require_luks.unwrap_or(true),
            marker_id: raw.marker_id.as_ref().map(|m| self.nonempty("target.marker_id", m)).transpose()?,
        })
    }

    fn encryption(&self, raw: &RawEncryption) -> Result<EncryptionSettings> {
        if raw.recipients.get_ref().is_empty() {
            return Err(self.err(
                "encryption.recipients",
                raw.recipients.span().start,
                "is empty; put at least one age public key (age1...) there, from `datavault keygen`",
            ));
        }
        let mut recipients = Vec::new();
        for (i, r) in raw.recipients.get_ref().iter().enumerate() {
            let parsed = age::x25519::Recipient::from_str(r.get_ref().trim()).map_err(|_| {
                let key = format!("encryption.recipients[{i}]");
                if r.get_ref().to_ascii_uppercase().contains("AGE-SECRET-KEY") {
                    // Never echo it: this line goes to the journal every night.
                    return self.err(
                        &key,
                        r.span().start,
                        "is a PRIVATE key (AGE-SECRET-KEY-...): put the public key (age1...) here, keep the private key off the Pi, and since this one was in the config, consider it exposed",
                    );
                }
                self.err(
                    &key,
                    r.span().start,
                    format!(
                        "{:?} is not an age public key (age1...); `datavault keygen --output FILE` makes one",
                        r.get_ref()
                    ),
                )
            })?;
            recipients.push(parsed);
        }
        let identity = raw.identity.as_ref().map(|p| self.abs_path("encryption.identity", p)).transpose()?;
        Ok(EncryptionSettings { recipients, identity })
    }

    fn compression(&self, raw: Option<&RawCompression>) -> Result<CompressionSettings> {
        let Some(c) = raw else {
            return Ok(CompressionSettings {
                level: 3,
                threads: 1,
                snapshot_workers: default_threads() as usize,
            });
        };
        let level = match &c.level {
            None => 3,
            Some(l) => self.int_in("compression.level", l, 1, 19)? as i32,
        };
        let threads = match &c.threads {
            None => 1,
            Some(t) => match self.int_in("compression.threads", t, 0, 64)? {
                0 => default_threads(),
                n => n as u32,
            },
        };
        let snapshot_workers =
            if c.threads.is_some() { threads as usize } else { default_threads() as usize };
        Ok(CompressionSettings { level, threads, snapshot_workers })
    }

    fn retention(&self, raw: Option<&RawRetention>) -> Result<RetentionPolicy> {
        let mut retention = RetentionPolicy::default();
        let Some(r) = raw else { return Ok(retention) };
        let field = |name: &str, f: &Option<Spanned<i64>>, default: u32| -> Result<u32> {
            match f {
                None => Ok(default),
                Some(x) => Ok(self.int_in(&format!("retention.{name}"), x, 0, 100_000)? as u32),
            }
        };
        retention.keep_last = field("keep_last", &r.keep_last, retention.keep_last)?;
        retention.keep_daily = field("keep_daily", &r.keep_daily, retention.keep_daily)?;
        retention.keep_weekly = field("keep_weekly", &r.keep_weekly, retention.keep_weekly)?;
        retention.keep_monthly = field("keep_monthly", &r.keep_monthly, retention.keep_monthly)?;
        retention.keep_pre_restore =
            field("keep_pre_restore", &r.keep_pre_restore, retention.keep_pre_restore)?;
        Ok(retention)
    }

    fn service(&self, s: &RawService) -> Result<ServiceSettings> {
        Ok(ServiceSettings {
            stop_command: self.nonempty("service.stop_command", &s.stop_command)?,
            start_command: self.nonempty("service.start_command", &s.start_command)?,
            timeout: std::time::Duration::from_secs(match &s.timeout_seconds {
                None => DEFAULT_SERVICE_TIMEOUT_SECONDS,
                Some(t) => self.int_in("service.timeout_seconds", t, 1, 3600)? as u64,
            }),
        })
    }

    fn drill(&self, raw: Option<&RawDrill>) -> Result<DrillSettings> {
        let Some(d) = raw else {
            return Ok(DrillSettings {
                checks: Vec::new(),
                scratch_dir: None,
                max_age_days: DEFAULT_DRILL_MAX_AGE_DAYS,
            });
        };
        Ok(DrillSettings {
            checks: d
                .checks
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| self.nonempty(&format!("drill.checks[{i}]"), c))
                .collect::<Result<_>>()?,
            scratch_dir: d.scratch_dir.as_ref().map(|p| self.abs_path("drill.scratch_dir", p)).transpose()?,
            max_age_days: match &d.max_age_days {
                None => DEFAULT_DRILL_MAX_AGE_DAYS,
                Some(n) => self.int_in("drill.max_age_days", n, 1, 366)? as u32,
            },
        })
    }

    fn gpio(&self, raw: Option<&RawGpio>) -> Result<GpioSettings> {
        let Some(g) = raw else {
            return Ok(GpioSettings {
                led_pin: None,
                act_led: false,
                button_pin: None,
                debounce: std::time::Duration::from_millis(50),
                long_press: std::time::Duration::from_secs(3),
            });
        };
        // BCM 0..=27 are the header's GPIOs on every Pi with a 40-pin header.
        let pin = |key: &str, p: &Option<Spanned<i64>>| -> Result<Option<u8>> {
            p.as_ref().map(|p| self.int_in(key, p, 0, 27).map(|n| n as u8)).transpose()
        };
        let led_pin = pin("gpio.led_pin", &g.led_pin)?;
        let button_pin = pin("gpio.button_pin", &g.button_pin)?;
        let act_led = g.act_led.unwrap_or(false);
        if led_pin.is_some() && led_pin == button_pin {
            return Err(Error::config(self.path, "gpio.led_pin and gpio.button_pin are the same pin"));
        }
        if led_pin.is_some() && act_led {
            // One status LED: two would disagree while the agent switches patterns.
            return Err(Error::config(
                self.path,
                "gpio.led_pin and gpio.act_led are both set; choose one status LED",
            ));
        }
        let ms = |key: &str, x: &Option<Spanned<i64>>, default: u64, min: i64, max: i64| -> Result<u64> {
            Ok(match x {
                None => default,
                Some(x) => self.int_in(key, x, min, max)? as u64,
            })
        };
        Ok(GpioSettings {
            led_pin,
            act_led,
            button_pin,
            debounce: std::time::Duration::from_millis(ms("gpio.debounce_ms", &g.debounce_ms, 50, 1, 1000)?),
            long_press: std::time::Duration::from_millis(ms(
                "gpio.long_press_ms",
                &g.long_press_ms,
                3000,
                500,
                60_000,
            )?),
        })
    }
}

pub const DEFAULT_SERVICE_TIMEOUT_SECONDS: u64 = 120;
/// A weekly drill timer plus a day of slack (#15).
pub const DEFAULT_DRILL_MAX_AGE_DAYS: u32 = 8;

// ==== [notify] (#15): pings, ntfy, e-mail ====================================================
// One block on purpose: the raw form, the settings and their validation live here together;
// the only lines elsewhere in this file are the ones marked "#15" and `drill.max_age_days`.

/// A URL that may carry a secret (a healthchecks UUID, an ntfy topic): `Debug` and
/// [`SecretUrl::redacted`] show only its scheme and host, so it cannot reach a log line, the
/// catalog or the metrics by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// A URL as given (the config's validation is in `Validator::url`).
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The full URL: only for the HTTP request itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `https://hc-ping.com/...`: enough to say which server failed.
    pub fn redacted(&self) -> String {
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("", &self.0));
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = host.rsplit('@').next().unwrap_or(host);
        format!("{scheme}://{host}/...")
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Where a backup run's pings go (healthchecks.io convention; any of them may be absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PingUrls {
    pub start: Option<SecretUrl>,
    pub success: Option<SecretUrl>,
    pub failure: Option<SecretUrl>,
}

impl PingUrls {
    pub fn any(&self) -> bool {
        self.start.is_some() || self.success.is_some() || self.failure.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtfySettings {
    /// The topic URL (`https://ntfy.sh/my-secret-topic`): the topic name is the password.
    pub url: SecretUrl,
    /// A file holding an access token (mode 0600, owned by the user running datavault).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailSettings {
    pub to: Vec<String>,
    /// `None`: `datavault@<host name>`.
    pub from: Option<String>,
    /// The system's sendmail interface (msmtp, ssmtp, postfix, exim all provide one).
    pub sendmail: PathBuf,
}

/// `[notify]`: who is told, and when the drive counts as nearly full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySettings {
    pub ping: PingUrls,
    pub ntfy: Option<NtfySettings>,
    pub email: Option<EmailSettings>,
    /// Longest one ping, post or sendmail may take.
    pub timeout: std::time::Duration,
    /// The drive is nearly full when it would be full within this many days at the current
    /// growth...
    pub full_within_days: u32,
    /// ...or when this much of it is used already.
    pub full_above_percent: u32,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            ping: PingUrls::default(),
            ntfy: None,
            email: None,
            timeout: std::time::Duration::from_secs(10),
            full_within_days: 14,
            full_above_percent: 90,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    ping_url: Option<Spanned<String>>,
    ping_start_url: Option<Spanned<String>>,
    ping_success_url: Option<Spanned<String>>,
    ping_failure_url: Option<Spanned<String>>,
    ntfy_url: Option<Spanned<String>>,
    ntfy_token_file: Option<Spanned<String>>,
    email_to: Option<Vec<Spanned<String>>>,
    email_from: Option<Spanned<String>>,
    sendmail: Option<Spanned<String>>,
    timeout_seconds: Option<Spanned<i64>>,
    full_within_days: Option<Spanned<i64>>,
    full_above_percent: Option<Spanned<i64>>,
}

impl Validator<'_> {
    fn notify(&self, raw: Option<&RawNotify>) -> Result<NotifySettings> {
        let mut n = NotifySettings::default();
        let Some(r) = raw else { return Ok(n) };
        let url = |key: &str, v: &Option<Spanned<String>>| v.as_ref().map(|u| self.url(key, u)).transpose();
        // healthchecks.io: success is the URL itself, start and failure are /start and /fail.
        let base = url("notify.ping_url", &r.ping_url)?;
        let derived =
            |suffix: &str| base.as_ref().map(|b| SecretUrl(format!("{}{suffix}", b.0.trim_end_matches('/'))));
        n.ping = PingUrls {
            start: url("notify.ping_start_url", &r.ping_start_url)?.or_else(|| derived("/start")),
            success: url("notify.ping_success_url", &r.ping_success_url)?.or_else(|| derived("")),
            failure: url("notify.ping_failure_url", &r.ping_failure_url)?.or_else(|| derived("/fail")),
        };
        if let Some(u) = &r.ntfy_url {
            n.ntfy = Some(NtfySettings {
                url: self.url("notify.ntfy_url", u)?,
                token_file: r
                    .ntfy_token_file
                    .as_ref()
                    .map(|p| self.abs_path("notify.ntfy_token_file", p))
                    .transpose()?,
            });
        } else if let Some(t) = &r.ntfy_token_file {
            return Err(self.err(
                "notify.ntfy_token_file",
                t.span().start,
                "is set without notify.ntfy_url; add the topic URL",
            ));
        }
        let to: Vec<String> = r
            .email_to
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, a)| self.address(&format!("notify.email_to[{i}]"), a))
            .collect::<Result<_>>()?;
        let from = r.email_from.as_ref().map(|a| self.address("notify.email_from", a)).transpose()?;
        let sendmail = match &r.sendmail {
            None => PathBuf::from("/usr/sbin/sendmail"),
            Some(p) => self.abs_path("notify.sendmail", p)?,
        };
        if !to.is_empty() {
            n.email = Some(EmailSettings { to, from, sendmail });
        } else if let Some(f) = r.email_from.as_ref().or(r.sendmail.as_ref()) {
            return Err(self.err(
                "notify.email_to",
                f.span().start,
                "is missing: name who gets the e-mail, e.g. email_to = [\"you@example.com\"]",
            ));
        }
        if let Some(t) = &r.timeout_seconds {
            n.timeout =
                std::time::Duration::from_secs(self.int_in("notify.timeout_seconds", t, 1, 120)? as u64);
        }
        if let Some(d) = &r.full_within_days {
            n.full_within_days = self.int_in("notify.full_within_days", d, 0, 366)? as u32;
        }
        if let Some(p) = &r.full_above_percent {
            n.full_above_percent = self.int_in("notify.full_above_percent", p, 1, 100)? as u32;
        }
        Ok(n)
    }

    /// http(s) only, one line, a host: the URL is used as written.
    fn url(&self, key: &str, value: &Spanned<String>) -> Result<SecretUrl> {
        let text = value.get_ref().trim();
        let rest = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://"));
        let why = match rest {
            None => Some("must start with https:// (or http://)"),
            Some(r) if r.split(['/', '?', '#']).next().unwrap_or("").is_empty() => Some("has no host"),
            Some(_) if text.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                Some("contains spaces or control characters")
            }
            Some(_) => None,
        };
        match why {
            // The value itself may be a secret: the message names the key and line only.
            Some(why) => Err(self.err(key, value.span().start, why)),
            None => Ok(SecretUrl(text.to_string())),
        }
    }

    /// A plain `local@domain` address: no display name, nothing that could add a header.
    fn address(&self, key: &str, value: &Spanned<String>) -> Result<String> {
        let a = value.get_ref().trim();
        let ok = a.split('@').count() == 2
            && a.split('@').all(|p| !p.is_empty())
            && !a.chars().any(|c| c.is_whitespace() || c.is_control() || "<>,;:\"()[]\\".contains(c));
        if !ok {
            return Err(self.err(
                key,
                value.span().start,
                format!("{a:?} is not a plain e-mail address (name@example.com)"),
            ));
        }
        Ok(a.to_string())
    }
}
// ==== end of [notify] (#15) ==================================================================

/// Where everything is, to check that the paths stay out of each other's way.
///
/// An in-place restore renames the database (with its -wal, -shm, -journal) and the uploads
/// folder aside and deletes them at the end: anything inside those (the backup drive mounted
/// in uploads, the state folder with the restore journal, a drill's scratch) would move and
/// be deleted with them. A backup drive inside uploads also puts every earlier archive into
/// each new one. So each of target, state and scratch must be outside the moved paths, and
/// the app's data off the backup drive and out of the state folder.
#[derive(Debug, Clone)]
pub struct Layout {
    pub database: PathBuf,
    pub uploads: Option<PathBuf>,
    pub target: PathBuf,
    pub state: PathBuf,
    pub scratch: Option<PathBuf>,
}

impl Layout {
    /// The paths an in-place restore moves, with their keys.
    fn moved(&self) -> Vec<(String, PathBuf)> {
        let mut v = vec![("source.database".to_string(), self.database.clone())];
        for suffix in ["-wal", "-shm", "-journal"] {
            v.push((
                format!("source.database's {suffix} file"),
                crate::fsutil::with_suffix(&self.database, suffix),
            ));
        }
        if let Some(u) = &self.uploads {
            v.push(("source.uploads".to_string(), u.clone()));
        }
        v
    }

    /// Ok, or the first overlap as a message naming both keys and the fix.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut ours = vec![
            ("target.path", &self.target, "keep the backups on the USB drive"),
            ("state.dir", &self.state, "keep the catalog and the restore journal in their own folder"),
        ];
        if let Some(s) = &self.scratch {
            ours.push(("drill.scratch_dir", s, "drills extract plaintext there"));
        }
        for (key, path, why) in &ours {
            for (moved_key, moved) in self.moved() {
                if path.starts_with(&moved) {
                    return Err(format!(
                        "{key} ({}) is inside {moved_key} ({}): a restore would move it away with the app's data and delete it, and backups would copy it; {why}, outside the app's data",
                        path.display(),
                        moved.display()
                    ));
                }
                if moved.starts_with(path) {
                    return Err(format!(
                        "{moved_key} ({}) is inside {key} ({}): keep the app's data out of datavault's own folders",
                        moved.display(),
                        path.display()
                    ));
                }
            }
        }
        if self.target.starts_with(&self.state) || self.state.starts_with(&self.target) {
            // The catalog must survive the loss of the USB drive and vice versa.
            return Err(
                "state.dir and target.path overlap; keep the catalog on the Pi and the archives on the USB drive".into(),
            );
        }
        if let Some(s) = &self.scratch {
            if s.starts_with(&self.state) || self.state.starts_with(s) {
                return Err(
                    "drill.scratch_dir and state.dir overlap; give the drills their own folder".into()
                );
            }
        }
        Ok(())
    }

    /// The same rules on the paths as they really are (symlinks on the way resolved), and no
    /// symlink as the database itself.
    pub fn resolved(&self) -> std::result::Result<Layout, String> {
        for (key, path) in std::iter::once(("source.database", &self.database))
            .chain(self.uploads.as_ref().map(|u| ("source.uploads", u)))
        {
            if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                let real = fs::canonicalize(path)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "something missing".into());
                return Err(format!(
                    "{key} {} is a symlink (to {real}); datavault reads and replaces real files and folders only: set {key} = \"{real}\"",
                    path.display()
                ));
            }
        }
        Ok(Layout {
            database: resolve(&self.database),
            uploads: self.uploads.as_deref().map(resolve),
            target: resolve(&self.target),
            state: resolve(&self.state),
            scratch: self.scratch.as_deref().map(resolve),
        })
    }
}

/// The path with its existing part resolved (symlinks followed), the rest appended.
fn resolve(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = p;
    loop {
        if let Ok(real) = fs::canonicalize(at) {
            let mut out = real;
            for c in missing.iter().rev() {
                out.push(c);
            }
            return out;
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                at = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// Check the settings' paths as they are on disk now (locked runs and `doctor`).
pub fn check_layout(s: &Settings) -> Result<()> {
    s.layout().resolved().and_then(|l| l.check()).map_err(|m| Error::config(&s.path, m))
}

/// The state folder holds the run lock and the restore journal, whose paths root renames and
/// deletes: it must be datavault's alone. Created private if missing; refused if another
/// user owns it or others may write in it.
pub fn check_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if fs::symlink_metadata(dir).is_err() {
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(dir).map_err(|e| {
            Error::config(
                dir,
                format!("cannot create the state folder: {e}; check state.dir and permissions"),
            )
        })?;
    }
    match state_dir_problem(dir) {
        Some(problem) => Err(Error::config(dir, problem)),
        None => Ok(()),
    }
}

/// What is wrong with the state folder, if anything (read-only: for `doctor` too).
pub fn state_dir_problem(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("cannot read the state folder: {e}")),
    };
    let me = rustix::process::geteuid().as_raw();
    if !m.is_dir() {
        return Some("state.dir is not a folder; point it at a folder for datavault's state".into());
    }
    if m.uid() != me {
        return Some(format!(
            "the state folder is owned by uid {}, not by the user running datavault (uid {me}); run `chown {me} {}` or choose another state.dir",
            m.uid(),
            dir.display()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Some(format!(
            "others may write in the state folder (mode {:o}); run `chmod 700 {}`",
            m.mode() & 0o7777,
            dir.display()
        ));
    }
    None
}

// ==== [offsite] (#10): the S3-compatible offsite copy =========================================
// One block on purpose: the raw form, the settings, the validation and its test live here
// together; the only lines elsewhere in this file are the three marked "#10".

/// Where and how `datavault offsite push` copies the drive's backups (`[offsite]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsiteSettings {
    /// `s3://BUCKET/PREFIX`, as written (for messages).
    pub url: String,
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    /// `https://host[:port]`; plain http only for 127.0.0.1 and [::1] (tests).
    pub endpoint: String,
    pub region: String,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key` (self-hosted
    /// servers, rclone, most non-AWS services).
    pub path_style: bool,
    /// TOML with `access_key_id` and `secret_access_key`, mode 0600, owned by the user running
    /// datavault. `None`: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` from the environment.
    pub credentials: Option<PathBuf>,
    /// Upload bytes per second on average (`None`: as fast as the link goes).
    pub max_rate: Option<u64>,
    /// Multipart part size in bytes (S3's minimum, 5 MiB, is the default: the smallest memory;
    /// the size doubles every 2,000 parts, so S3's 10,000-part limit allows ~300 GB files).
    pub part_size: usize,
    /// Parts uploaded at once. 1 (the default) sends on the calling thread: memory about
    /// `2 * part_size`; more use worker threads: about `part_size * (2 * parts_in_flight + 1)`
    /// plus allocator arenas.
    pub parts_in_flight: usize,
    /// Longest one HTTP request may take (a stalled connection fails after this).
    pub timeout: std::time::Duration,
    /// What the remote keeps: `[offsite.retention]`, each missing key taken from `[retention]`.
    pub retention: RetentionPolicy,
    /// The offsite copy is "behind" (status, doctor, the LED, the metrics) when a backup on
    /// the drive has waited longer than this to be pushed (`ops::health::offsite_behind`).
    pub max_behind_hours: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOffsite {
    url: Spanned<String>,
    endpoint: Spanned<String>,
    region: Option<Spanned<String>>,
    path_style: Option<bool>,
    credentials: Option<Spanned<String>>,
    max_rate: Option<Spanned<i64>>,
    part_size_mib: Option<Spanned<i64>>,
    parts_in_flight: Option<Spanned<i64>>,
    timeout_secs: Option<Spanned<i64>>,
    max_behind_hours: Option<Spanned<i64>>,
    retention: Option<RawRetention>,
}

// Long on purpose (#12): one key after another, each with its own range and message, in the
// order of the README's table; split, the list would only move.
fn parse_offsite(v: &Validator, o: &RawOffsite, local: &RetentionPolicy) -> Result<OffsiteSettings> {
    let url = o.url.get_ref().trim();
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(v.err(
            "offsite.url",
            o.url.span().start,
            format!("{url:?} must look like s3://BUCKET/PREFIX"),
        ));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(v.err(
            "offsite.url",
            o.url.span().start,
            format!(
                "names bucket {bucket:?}: a bucket name is 3-63 lowercase letters, digits, dots or hyphens"
            ),
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() && crate::store::backend::check_path(prefix).is_err() {
        return Err(v.err(
            "offsite.url",
            o.url.span().start,
            format!("has prefix {prefix:?}: use plain folder names separated by single slashes"),
        ));
    }
    let endpoint = o.endpoint.get_ref().trim().trim_end_matches('/').to_string();
    check_endpoint(&endpoint).map_err(|why| v.err("offsite.endpoint", o.endpoint.span().start, why))?;
    let region = match &o.region {
        None => "us-east-1".to_string(),
        Some(r) => v.nonempty("offsite.region", r)?.trim().to_string(),
    };
    let credentials = o.credentials.as_ref().map(|c| v.abs_path("offsite.credentials", c)).transpose()?;
    let max_rate = match &o.max_rate {
        None => None,
        Some(r) => match v.int_in("offsite.max_rate", r, 0, 1 << 40)? {
            0 => None,
            n if n < 16 * 1024 => {
                return Err(v.err(
                    "offsite.max_rate",
                    r.span().start,
                    format!("is {n} bytes/s; below 16384 a 5 MiB part takes minutes and requests time out (0 = no limit)"),
                ))
            }
            n => Some(n as u64),
        },
    };
    let part_size = match &o.part_size_mib {
        None => 5 << 20,
        Some(p) => (v.int_in("offsite.part_size_mib", p, 5, 512)? as usize) << 20,
    };
    let parts_in_flight = match &o.parts_in_flight {
        None => 1,
        Some(p) => v.int_in("offsite.parts_in_flight", p, 1, 16)? as usize,
    };
    let timeout = std::time::Duration::from_secs(match &o.timeout_secs {
        None => 120,
        Some(t) => v.int_in("offsite.timeout_secs", t, 1, 3600)? as u64,
    });
    let max_behind_hours = match &o.max_behind_hours {
        None => DEFAULT_OFFSITE_MAX_BEHIND_HOURS,
        Some(h) => v.int_in("offsite.max_behind_hours", h, 1, 24 * 366)? as u32,
    };
    let mut retention = *local;
    if let Some(r) = &o.retention {
        let field = |name: &str, f: &Option<Spanned<i64>>, default: u32| -> Result<u32> {
            match f {
                None => Ok(default),
                Some(x) => Ok(v.int_in(&format!("offsite.retention.{name}"), x, 0, 100_000)? as u32),
            }
        };
        retention.keep_last = field("keep_last", &r.keep_last, retention.keep_last)?;
        retention.keep_daily = field("keep_daily", &r.keep_daily, retention.keep_daily)?;
        retention.keep_weekly = field("keep_weekly", &r.keep_weekly, retention.keep_weekly)?;
        retention.keep_monthly = field("keep_monthly", &r.keep_monthly, retention.keep_monthly)?;
        retention.keep_pre_restore =
            field("keep_pre_restore", &r.keep_pre_restore, retention.keep_pre_restore)?;
    }
    Ok(OffsiteSettings {
        url: url.to_string(),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint,
        region,
        path_style: o.path_style.unwrap_or(false),
        credentials,
        max_rate,
        part_size,
        parts_in_flight,
        timeout,
        retention,
        max_behind_hours,
    })
}

/// A day: the push follows every backup and the offsite timer retries hourly, so a backup
/// normally leaves within the hour; a day of a down link, server or key is worth a look.
pub const DEFAULT_OFFSITE_MAX_BEHIND_HOURS: u32 = 24;

/// `https://host[:port]`, or `http://` to the loopback address only: credentials and backups
/// never cross a network in clear (the archives are encrypted, the signatures are not secret,
/// but the listing and the request metadata are).
fn check_endpoint(endpoint: &str) -> std::result::Result<(), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("{endpoint:?} must be a URL like https://s3.example.com"))?;
    let host_port = rest.split('/').next().unwrap_or("");
    if host_port.is_empty() || rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(format!("{endpoint:?} must be scheme://host[:port] with no path, user or query"));
    }
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    match scheme {
        "https" => Ok(()),
        "http" if host == "127.0.0.1" || host == "::1" => Ok(()),
        "http" => Err(format!(
            "{endpoint:?} is plain http: use https (plain http is allowed only to 127.0.0.1 or [::1], for tests)"
        )),
        _ => Err(format!("{endpoint:?} must start with https://")),
    }
}

#[cfg(test)]
mod offsite_tests {
    use super::*;

    const KEY: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn with(offsite: &str) -> Result<Settings> {
        let text = format!(
            "[source]\ndatabase = \"/a/app.db\"\n[target]\npath = \"/mnt/x\"\n[encryption]\nrecipients = [\"{KEY}\"]\n\
             [retention]\nkeep_daily = 9\n[offsite]\n{offsite}"
        );
        Settings::parse(Path::new("/etc/datavault/datavault.toml"), &text)
    }

    #[test]
    fn offsite_section_parses_with_defaults_and_inherits_retention() {
        let s =
            with("url = \"s3://my-bucket/pis/kitchen/\"\nendpoint = \"https://s3.example.com\"\n").unwrap();
        let o = s.offsite.unwrap();
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("my-bucket", "pis/kitchen"));
        assert_eq!(o.region, "us-east-1");
        assert!(!o.path_style && o.credentials.is_none() && o.max_rate.is_none());
        assert_eq!((o.part_size, o.parts_in_flight), (5 << 20, 1));
        assert_eq!(o.retention.keep_daily, 9, "the local policy by default");
        let s = with(
            "url = \"s3://b12\"\nendpoint = \"http://127.0.0.1:9000\"\npath_style = true\nmax_rate = 1000000\n\
             credentials = \"/etc/datavault/offsite.credentials\"\n[offsite.retention]\nkeep_daily = 30\n",
        )
        .unwrap();
        let o = s.offsite.unwrap();
        assert_eq!(
            (o.prefix.as_str(), o.max_rate, o.retention.keep_daily, o.retention.keep_last),
            ("", Some(1_000_000), 30, 7)
        );
        assert!(with("url = \"s3://b12\"\nendpoint = \"http://[::1]:9000\"\n").is_ok());
    }

    #[test]
    fn offsite_mistakes_are_named_with_their_line() {
        for (body, expect) in [
            ("url = \"https://b/x\"\nendpoint = \"https://e\"\n", "offsite.url"),
            ("url = \"s3://B_ad/x\"\nendpoint = \"https://e\"\n", "bucket"),
            ("url = \"s3://bucket/../x\"\nendpoint = \"https://e\"\n", "prefix"),
            ("url = \"s3://bucket\"\nendpoint = \"http://s3.example.com\"\n", "plain http"),
            ("url = \"s3://bucket\"\nendpoint = \"ftp://e\"\n", "https://"),
            ("url = \"s3://bucket\"\nendpoint = \"https://e/path\"\n", "no path"),
            (
                "url = \"s3://bucket\"\nendpoint = \"https://e\"\ncredentials = \"rel/c\"\n",
                "offsite.credentials",
            ),
            ("url = \"s3://bucket\"\nendpoint = \"https://e\"\nmax_rate = 10\n", "offsite.max_rate"),
            ("url = \"s3://bucket\"\nendpoint = \"https://e\"\npart_size_mib = 1\n", "offsite.part_size_mib"),
            ("url = \"s3://bucket\"\nendpoint = \"https://e\"\nsecret_access_key = \"x\"\n", "unknown field"),
            ("url = \"s3://bucket\"\n", "endpoint"),
        ] {
            let e = with(body).err().unwrap_or_else(|| panic!("accepted: {body}"));
            assert_eq!(e.exit_code(), crate::error::exit::USAGE);
            let m = e.to_string();
            assert!(m.contains(expect) && m.contains("line "), "{body}: {m}");
        }
    }
}
// ==== end of [offsite] (#10) ====================================================================

/// `threads = 0`: one zstd worker per core, at most 4. Not the default: on 2 cores the
/// workers compete with hashing and encryption, and each holds several MiB of buffers
/// (measured: 74 MiB peak RSS with 2 workers, 15 MiB with 1, and 1 was faster).
fn default_threads() -> u32 {
    std::thread::available_parallelism().map(|n| n.get().min(4) as u32).unwrap_or(1)
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn err(&self, key: &str, offset: usize, message: impl std::fmt::Display) -> Error {
        Error::config(self.path, format!("line {}: {key} {message}", self.line(offset)))
    }

    fn abs_path(&self, key: &str, value: &Spanned<String>) -> Result<PathBuf> {
        let text = value.get_ref();
        let p = PathBuf::from(text);
        let why = if text.is_empty() || !p.is_absolute() {
            Some("must be an absolute path (starting with /)")
        } else if text.contains('\0') {
            Some("contains a NUL byte")
        } else if p.components().any(|c| c == std::path::Component::ParentDir) {
            // `..` would defeat the overlap checks below (and means something else once a
            // folder on the way is a symlink).
            Some("must not contain '..'; write the path it leads to")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(self.err(key, value.span().start, format!("{text:?} {why}")));
        }
        // Lexically normal: no `.` components, no doubled or trailing slashes.
        Ok(p.components().collect())
    }

    fn int_in(&self, key: &str, value: &Spanned<i64>, min: i64, max: i64) -> Result<i64> {
        let n = *value.get_ref();
        if n < min || n > max {
            return Err(self.err(
                key,
                value.span().start,
                format!("is {n}; it must be between {min} and {max}"),
            ));
        }
        Ok(n)
    }

    fn nonempty(&self, key: &str, value: &Spanned<String>) -> Result<String> {
        if value.get_ref().trim().is_empty() {
            return Err(self.err(key, value.span().start, "is empty"));
        }
        Ok(value.get_ref().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn example() -> String {
        TEMPLATE.replace("age1-replace-with-your-public-key", KEY)
    }

    fn parse(text: &str) -> Result<Settings> {
        Settings::parse(Path::new("/etc/datavault/datavault.toml"), text)
    }

    fn message(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => {
                assert_eq!(e.exit_code(), crate::error::exit::USAGE);
                e.to_string()
            }
        }
    }

    #[test]
    fn the_shipped_template_parses_once_a_key_is_in() {
        let s = parse(&example()).unwrap();
        assert_eq!(s.source.database, Path::new("/srv/app/data/app.db"));
        assert_eq!(s.retention.keep_daily, 7);
        assert_eq!(s.compression.level, 3);
        assert!(s.service.is_some());
        assert!(s.target.require_luks);
    }

    #[test]
    fn compression_threads_sets_the_snapshot_sealers_too_and_its_absence_means_one_per_core() {
        let unset = parse(&example()).unwrap();
        assert_eq!(unset.compression.threads, 1, "archives: one zstd worker unless asked");
        assert_eq!(unset.compression.snapshot_workers, default_threads() as usize);
        for n in [1, 2] {
            let text = example().replace("\nlevel = 3\n", &format!("\nlevel = 3\nthreads = {n}\n"));
            let set = parse(&text).unwrap();
            assert_eq!((set.compression.threads, set.compression.snapshot_workers), (n, n as usize));
        }
    }

    #[test]
    fn the_template_placeholder_names_the_fix() {
        let m = message(TEMPLATE);
        assert!(m.contains("encryption.recipients[0]") && m.contains("keygen"), "{m}");
    }

    #[test]
    fn optional_sections_may_be_missing() {
        let text = format!(
            "[source]\ndatabase = \"/a/app.db\"\n[target]\npath = \"/mnt/x\"\n[encryption]\nrecipients = [\"{KEY}\"]\n"
        );
        let s = parse(&text).unwrap();
        assert!(s.source.uploads.is_none());
        assert!(s.service.is_none());
        assert!(s.drill.checks.is_empty());
        assert!(s.encryption.identity.is_none());
        assert_eq!(s.state.dir, Path::new("/var/lib/datavault"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = example().replace("require_luks = true", "require_lusk = true");
        let m = message(&text);
        assert!(m.contains("require_lusk") && m.contains("line 21"), "{m}");
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        for (from, to, expect) in [
            ("keep_daily = 7", "keep_daily = -1", "retention.keep_daily"),
            ("keep_daily = 7", "keep_daily = \"seven\"", "line"),
            ("level = 3", "level = 42", "compression.level"),
            ("path = \"/mnt/datavault\"", "path = \"mnt/datavault\"", "target.path"),
            ("dir = \"/var/lib/datavault\"", "dir = \"\"", "state.dir"),
            ("require_mountpoint = true", "require_mountpoint = \"yes\"", "line"),
        ] {
            let m = message(&example().replace(from, to));
            assert!(m.contains(expect) && m.contains("line "), "{to}: {m}");
        }
    }

    #[test]
    fn one_status_led_only() {
        let m = message(&example().replace("act_led = false", "act_led = true\nled_pin = 17"));
        assert!(m.contains("gpio.led_pin and gpio.act_led"), "{m}");
    }

    #[test]
    fn notify_is_off_by_default_and_derives_the_healthchecks_urls() {
        let s = parse(&example()).unwrap();
        assert_eq!(s.notify, NotifySettings::default());
        assert_eq!(s.drill.max_age_days, 8);
        let s = parse(&example().replace(
            "[notify]\n",
            "[notify]\nping_url = \"https://hc-ping.com/abc-uuid/\"\nping_failure_url = \"https://kuma.lan/api/push/T?status=down\"\nemail_to = [\"a@b.example\"]\n",
        ))
        .unwrap();
        let p = &s.notify.ping;
        assert_eq!(p.start.as_ref().unwrap().expose(), "https://hc-ping.com/abc-uuid/start");
        assert_eq!(p.success.as_ref().unwrap().expose(), "https://hc-ping.com/abc-uuid");
        assert_eq!(p.failure.as_ref().unwrap().expose(), "https://kuma.lan/api/push/T?status=down");
        assert_eq!(format!("{:?}", p.success), "Some(https://hc-ping.com/...)", "Debug hides the secret");
        let e = s.notify.email.unwrap();
        assert_eq!((e.to.len(), e.sendmail.as_path()), (1, Path::new("/usr/sbin/sendmail")));
    }

    #[test]
    fn bad_notify_values_name_the_key_but_not_the_secret() {
        for (line, expect) in [
            ("ping_url = \"ftp://secret-uuid\"", "notify.ping_url"),
            ("ntfy_url = \"https:///secret-topic\"", "notify.ntfy_url"),
            ("email_to = [\"x@y\\nBcc: z@w\"]", "notify.email_to[0]"),
            ("email_from = \"a@b\"", "notify.email_to"),
            ("ntfy_token_file = \"/etc/t\"", "notify.ntfy_url"),
            ("full_above_percent = 0", "notify.full_above_percent"),
        ] {
            let m = message(&example().replace("[notify]\n", &format!("[notify]\n{line}\n")));
            assert!(m.contains(expect) && m.contains("line "), "{line}: {m}");
            assert!(!m.contains("secret"), "{line}: {m}");
        }
        let m = message(&example().replace("max_age_days = 8", "max_age_days = 0"));
        assert!(m.contains("drill.max_age_days"), "{m}");
    }

    #[test]
    fn overlapping_state_and_target_are_refused() {
        let m = message(&example().replace("dir = \"/var/lib/datavault\"", "dir = \"/mnt/datavault/state\""));
        assert!(m.contains("overlap"), "{m}");
    }
}
