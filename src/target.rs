//! The target guard: decides whether archives may be written to, or read from, the target folder.
//!
//! The one thing to know: when the USB drive is not mounted, `/mnt/datavault` is still there,
//! an empty folder on the SD card. Writing archives into it would quietly fill the SD card (and
//! the Pi's root filesystem with it, taking the app down) while nothing leaves the device;
//! reading from it would make `list` answer "no archives" in the middle of a disaster. So we
//! never trust the folder: we ask the kernel's mount table whether the folder is a mount point
//! and whether the device mounted there is a LUKS dm-crypt mapping, so that a lost drive gives
//! nothing away. Both checks can be turned off in the config (`target.require_mountpoint`,
//! `target.require_luks`) for people who back up elsewhere, but they are on by default.
//!
//! `/proc` and `/sys` are read under a [`SystemRoot`] so that tests can use fixtures (the test
//! kernel has no device-mapper). The target path itself and its free space are always looked up
//! on the real filesystem: that is where the archives will land.
//!
//! [`inspect`] only reports; [`require_writable`] and [`require_readable`] turn a report into
//! [`Error::TargetNotReady`] (exit code 3), whose message names the first problem and its fix.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::TargetSettings;
use crate::error::{Error, Result};

/// Environment variable that points [`SystemRoot::from_env`] at a fixture tree.
pub const SYSTEM_ROOT_ENV: &str = "DATAVAULT_SYSTEM_ROOT";

/// Root of the filesystem that /proc and /sys are read under ("/" normally); tests point it at fixtures.
#[derive(Debug, Clone)]
pub struct SystemRoot(pub PathBuf);

impl SystemRoot {
    pub fn real() -> Self {
        SystemRoot(PathBuf::from("/"))
    }

    /// `$DATAVAULT_SYSTEM_ROOT` if set and non-empty, else "/". Integration tests of the binary
    /// use it to feed the guard a mount table with a LUKS drive in it.
    pub fn from_env() -> Self {
        match std::env::var_os(SYSTEM_ROOT_ENV) {
            Some(v) if !v.is_empty() => SystemRoot(PathBuf::from(v)),
            _ => SystemRoot::real(),
        }
    }

    pub fn mountinfo_path(&self) -> PathBuf {
        self.0.join("proc/self/mountinfo")
    }

    /// Other processes that have any of `files` open ("1234 (node)"), from `/proc/*/fd`.
    /// How datavault tells a running app before it swaps its database: an app that keeps
    /// writing to a database renamed away loses every write (red team #8).
    pub fn processes_using(&self, files: &[PathBuf]) -> Vec<String> {
        let wanted: Vec<PathBuf> = files.iter().filter_map(|f| fs::canonicalize(f).ok()).collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let me = std::process::id().to_string();
        let Ok(procs) = fs::read_dir(self.0.join("proc")) else { return Vec::new() };
        let mut found = Vec::new();
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
            let uses = fds
                .flatten()
                .any(|fd| fs::read_link(fd.path()).map(|t| wanted.contains(&t)).unwrap_or(false));
            if uses {
                let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                found.push(format!("{pid} ({})", comm.trim()));
            }
        }
        found.sort();
        found
    }

    fn dm_uuid_path(&self, major: u32, minor: u32) -> PathBuf {
        self.0.join(format!("sys/dev/block/{major}:{minor}/dm/uuid"))
    }
}

/// One line of `/proc/self/mountinfo`, unescaped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// The folder of the filesystem that is mounted here: `/`, except for bind mounts.
    #[serde(skip)]
    pub fs_root: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub fstype: String,
    /// Mount source, e.g. `/dev/mapper/usb`.
    pub source: String,
    /// Mounted read-only, either this mount or the whole filesystem. ext4 on a flaky USB drive
    /// turns itself read-only after an error (`errors=remount-ro`), and only the superblock
    /// options show it, so both are looked at.
    pub read_only: bool,
}

/// What [`inspect`] found out about the target folder.
#[derive(Debug, Clone, Serialize)]
pub struct TargetState {
    /// The path as configured (`target.path`).
    pub path: PathBuf,
    /// The path exists and is a directory.
    pub exists: bool,
    /// Something other than a directory is at the path (then `exists` is false).
    pub not_a_directory: bool,
    /// The mount that contains the path (longest mount point prefix; the topmost on ties).
    pub mount: Option<MountEntry>,
    /// The path itself is a mount point.
    pub is_mountpoint: bool,
    /// The dm uuid when the mount's device is a dm-crypt LUKS mapping (`CRYPT-LUKS1-...` or
    /// `CRYPT-LUKS2-...`).
    pub luks: Option<String>,
    /// Bytes an unprivileged writer may still use (`f_bavail * f_frsize`); 0 if not `exists`.
    pub free_bytes: u64,
    /// Size of the filesystem (`f_blocks * f_frsize`); 0 if not `exists`.
    pub total_bytes: u64,
    /// The id in the drive's `.datavault-target` marker, if there is one.
    pub marker_id: Option<String>,
}

/// The file `scripts/setup-usb.sh` writes at the root of a prepared drive.
pub const MARKER_FILE: &str = ".datavault-target";

/// Read `id = "..."` from a marker file's text.
pub fn parse_marker(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("id")?.trim_start().strip_prefix('=')?.trim();
        let id = rest.trim_matches('"').trim();
        (!id.is_empty()).then(|| id.to_string())
    })
}

/// Looks at the target folder and reports; "not ready" is never an error here.
///
/// Errors only for unexpected I/O: an unreadable or garbled mountinfo, a dm uuid file that
/// exists but cannot be read, a path that cannot be resolved for another reason than "absent".
pub fn inspect(settings: &TargetSettings, root: &SystemRoot) -> Result<TargetState> {
    let configured = &settings.path;
    let mut state = TargetState {
        path: configured.clone(),
        exists: false,
        not_a_directory: false,
        mount: None,
        is_mountpoint: false,
        luks: None,
        free_bytes: 0,
        total_bytes: 0,
        marker_id: None,
    };

    // Resolved on the real filesystem, because a symlinked target must be judged by where the
    // archives actually land; mountinfo lists canonical paths.
    let canonical = match fs::canonicalize(configured) {
        Ok(p) => p,
        Err(e) if is_absent(&e) => return Ok(state),
        Err(e) => return Err(Error::io(format!("resolving target {}", configured.display()), e)),
    };
    let meta = fs::metadata(&canonical)
        .map_err(|e| Error::io(format!("reading target {}", canonical.display()), e))?;
    if !meta.is_dir() {
        state.not_a_directory = true;
        return Ok(state);
    }
    state.exists = true;

    let mounts = read_mounts(root)?;
    if let Some(mount) = containing_mount(&mounts, &canonical) {
        state.is_mountpoint = beneath_self_binds(&mounts, mount).mount_point == canonical;
        state.luks = dm_uuid(root, mount.major, mount.minor)?.filter(|u| u.starts_with("CRYPT-LUKS"));
        state.mount = Some(mount.clone());
    }

    let vfs = rustix::fs::statvfs(&canonical)
        .map_err(|e| Error::io(format!("checking free space on {}", canonical.display()), e.into()))?;
    state.free_bytes = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    state.total_bytes = vfs.f_blocks.saturating_mul(vfs.f_frsize);
    // On the drive, so possibly anything: read at most a few KiB of a regular file.
    // A link is no marker: it could point to a marker file on another drive.
    let marker = canonical.join(MARKER_FILE);
    state.marker_id = std::fs::symlink_metadata(&marker)
        .ok()
        .filter(|m| m.is_file())
        .and_then(|_| crate::fsutil::read_regular(&marker, 4096).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| parse_marker(&t));
    Ok(state)
}

impl TargetState {
    /// Problems that forbid WRITING, in the order a user must fix them: missing, not mounted,
    /// not LUKS, read-only. Each message continues `target PATH: ` and says how to fix it.
    ///
    /// A missing folder is reported alone: it has no mount to judge yet.
    pub fn problems(&self, settings: &TargetSettings) -> Vec<String> {
        if !self.exists {
            return vec![self.missing_message()];
        }
        let mut problems = Vec::new();
        if settings.require_mountpoint && !self.is_mountpoint {
            problems.push(not_mounted_message(&self.path, Access::Write));
        }
        if settings.require_luks && self.luks.is_none() {
            problems.push(self.not_luks_message());
        }
        if let Some(wanted) = &settings.marker_id {
            match &self.marker_id {
                None => problems.push(format!(
                    "has no {MARKER_FILE} marker, so it is not the drive prepared for datavault (id {wanted}); \
                     plug in the right drive, or prepare this one with scripts/setup-usb.sh"
                )),
                Some(found) if found != wanted => problems.push(format!(
                    "is a different datavault drive (marker id {found}, the config wants {wanted}); plug in the \
                     right drive or update target.marker_id"
                )),
                Some(_) => {}
            }
        }
        if let Some(m) = self.mount.as_ref().filter(|m| m.read_only) {
            problems.push(format!(
                "is on a read-only mount ({} at {}); if the kernel made it read-only after disk \
                 errors, unmount the drive, run `fsck` on it and mount it again, otherwise remount it read-write",
                m.source,
                m.mount_point.display()
            ));
        }
        problems
    }

    fn missing_message(&self) -> String {
        if self.not_a_directory {
            "is not a folder; point target.path at the folder where the USB drive is mounted".to_string()
        } else {
            "does not exist; plug in the USB drive and mount it (README: LUKS USB setup)".to_string()
        }
    }

    fn not_luks_message(&self) -> String {
        const FIX: &str =
            "open the drive with cryptsetup and mount the mapping, or set target.require_luks = false";
        match &self.mount {
            Some(m) if self.is_mountpoint => format!(
                "is mounted from {} ({}), which is not a LUKS-encrypted dm-crypt device; {FIX}",
                m.source, m.fstype
            ),
            Some(m) => format!(
                "is on {} ({}, mounted at {}), which is not a LUKS-encrypted dm-crypt device; {FIX}",
                m.source,
                m.fstype,
                m.mount_point.display()
            ),
            None => format!("is on no mount listed in /proc/self/mountinfo, so it is not on a LUKS-encrypted dm-crypt device; {FIX}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Access {
    Read,
    Write,
}

fn not_mounted_message(path: &Path, access: Access) -> String {
    let consequence = match access {
        Access::Write => "writing there would fill the SD card",
        Access::Read => "the archives on it cannot be seen there",
    };
    format!(
        "is not a mount point, so the USB drive is not mounted and {consequence}; mount the drive \
         (`mount {}`) or set target.require_mountpoint = false",
        path.display()
    )
}

/// For commands that write (backup, prune, restore's pre-restore backup): the first of
/// [`TargetState::problems`], or too little room for `needed_bytes`, is an
/// [`Error::TargetNotReady`].
pub fn require_writable(
    settings: &TargetSettings,
    root: &SystemRoot,
    needed_bytes: u64,
) -> Result<TargetState> {
    let state = inspect(settings, root)?;
    if let Some(first) = state.problems(settings).into_iter().next() {
        return Err(Error::target(&settings.path, first));
    }
    if state.free_bytes < needed_bytes {
        return Err(Error::target(
            &settings.path,
            format!(
                "has {} free but the archive needs about {}; run `datavault prune`, delete old archives \
                 or use a bigger drive",
                human_bytes(state.free_bytes),
                human_bytes(needed_bytes)
            ),
        ));
    }
    Ok(state)
}

/// For commands that only read archives (list, verify, drill, restore): the folder must exist,
/// and be a mount point when `require_mountpoint` is set. LUKS is not required to read: an
/// archive is age-encrypted anyway, and refusing to restore from an old plain drive helps no one.
pub fn require_readable(settings: &TargetSettings, root: &SystemRoot) -> Result<TargetState> {
    let state = inspect(settings, root)?;
    if !state.exists {
        return Err(Error::target(&settings.path, state.missing_message()));
    }
    if settings.require_mountpoint && !state.is_mountpoint {
        // An empty folder on the SD card would otherwise make `list` say "no archives".
        return Err(Error::target(&settings.path, not_mounted_message(&settings.path, Access::Read)));
    }
    Ok(state)
}

/// Binary units with one decimal: "512 B", "8.1 MiB", "1.2 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    // Compare the rounded value, so that 1023.96 KiB reads "1.0 MiB", not "1024.0 KiB".
    while (value * 10.0).round() >= 1024.0 * 10.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Every mount in `{root}/proc/self/mountinfo`, in the kernel's order (later ones are on top).
pub fn read_mounts(root: &SystemRoot) -> Result<Vec<MountEntry>> {
    let path = root.mountinfo_path();
    let text = fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    parse_mountinfo(&text).map_err(|m| {
        Error::io(format!("parsing {}", path.display()), io::Error::new(io::ErrorKind::InvalidData, m))
    })
}

fn parse_mountinfo(text: &str) -> std::result::Result<Vec<MountEntry>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_mountinfo_line(line).ok_or_else(|| format!("line {}: unexpected format: {line}", i + 1))
        })
        .collect()
}

/// `36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
/// id, parent id, major:minor, root, mount point, mount options, any number of optional fields
/// ended by `-`, then fstype, source and superblock options (proc(5)).
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    // Split on single spaces, not runs of whitespace: the kernel escapes blanks inside fields,
    // and a source may be empty.
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = 6 + fields.get(6..)?.iter().position(|f| *f == "-")?;
    let (major, minor) = fields[2].split_once(':')?;
    let mount_options = fields[5];
    let super_options = fields.get(separator + 3).copied().unwrap_or("");
    let is_ro = |options: &str| options.split(',').any(|o| o == "ro");
    Some(MountEntry {
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        fs_root: PathBuf::from(OsString::from_vec(unescape(fields[3]))),
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        fstype: String::from_utf8_lossy(&unescape(fields.get(separator + 1)?)).into_owned(),
        source: String::from_utf8_lossy(&unescape(fields.get(separator + 2)?)).into_owned(),
        read_only: is_ro(mount_options) || is_ro(super_options),
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
            if let Some(d) = digits {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The mount whose mount point is the longest prefix of `path` (whole components: `/mnt/data`
/// does not contain `/mnt/datavault`). On equal mount points the later entry wins: it was
/// mounted on top and hides the others, e.g. the real drive over a systemd automount.
fn containing_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for m in mounts.iter().filter(|m| path.starts_with(&m.mount_point)) {
        let deeper_or_on_top = match best {
            None => true,
            Some(b) => m.mount_point.components().count() >= b.mount_point.components().count(),
        };
        if deeper_or_on_top {
            best = Some(m);
        }
    }
    best
}

/// The mount that `m` merely repeats, if `m` is a folder bind-mounted onto itself: systemd's
/// `ReadWritePaths=` does that in every datavault unit's sandbox, so an empty `/mnt/datavault`
/// on the SD card would look like a mount point there (found on the Pi VM, #13: the boot drill
/// then said "no complete backup" instead of "the drive is not mounted"). A self-bind shows
/// the very folder that was visible at that path before, from the same device; the real
/// mount point is the one beneath it. Its options (read-only or not) still apply.
fn beneath_self_binds<'a>(mounts: &'a [MountEntry], mut m: &'a MountEntry) -> &'a MountEntry {
    loop {
        let Some(index) = mounts.iter().position(|x| std::ptr::eq(x, m)) else { return m };
        let Some(below) = containing_mount(&mounts[..index], &m.mount_point) else { return m };
        let Ok(rest) = m.mount_point.strip_prefix(&below.mount_point) else { return m };
        let same_folder =
            (below.major, below.minor) == (m.major, m.minor) && below.fs_root.join(rest) == m.fs_root;
        if !same_folder {
            return m;
        }
        m = below;
    }
}

/// The device-mapper uuid of a block device, or None when it is not a dm device (no such file).
fn dm_uuid(root: &SystemRoot, major: u32, minor: u32) -> Result<Option<String>> {
    let path = root.dm_uuid_path(major, minor);
    match fs::read_to_string(&path) {
        Ok(uuid) => Ok(Some(uuid.trim().to_string())),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// "Not there": ENOENT, or ENOTDIR when a component of the path is a file.
fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
}

#[cfg(test)]
mod marker_tests {
    use super::*;

    #[test]
    fn a_missing_or_different_marker_forbids_writing() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TargetSettings {
            path: dir.path().to_path_buf(),
            require_mountpoint: false,
            require_luks: false,
            marker_id: Some("abc123".into()),
        };
        let root = SystemRoot::real();
        let e = require_writable(&settings, &root, 0).err().unwrap();
        assert_eq!(e.exit_code(), crate::error::exit::TARGET_NOT_READY);
        assert!(e.to_string().contains("marker"), "{e}");
        fs::write(dir.path().join(MARKER_FILE), "# datavault target\nid = \"other\"\n").unwrap();
        assert!(require_writable(&settings, &root, 0).err().unwrap().to_string().contains("different"));
        fs::write(dir.path().join(MARKER_FILE), "id = \"abc123\"\n").unwrap();
        require_writable(&settings, &root, 0).unwrap();
    }

    #[test]
    fn marker_lines_parse() {
        assert_eq!(parse_marker("id = \"x1\""), Some("x1".into()));
        assert_eq!(parse_marker("# c\nid=x2\n"), Some("x2".into()));
        assert_eq!(parse_marker("idx = 3"), None);
        assert_eq!(parse_marker(""), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;
    use tempfile::TempDir;

    /// A fake `/proc` + `/sys` tree, and a real target folder whose canonical path the fixture
    /// mountinfo names (`{target}` in the text).
    struct Fixture {
        system: TempDir,
        target_dir: TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture { system: tempfile::tempdir().unwrap(), target_dir: tempfile::tempdir().unwrap() }
        }

        fn target(&self) -> PathBuf {
            fs::canonicalize(self.target_dir.path()).unwrap()
        }

        fn root(&self) -> SystemRoot {
            SystemRoot(self.system.path().to_path_buf())
        }

        fn mountinfo(&self, text: &str) -> &Self {
            let target = escape(self.target().to_str().unwrap());
            let path = self.system.path().join("proc/self/mountinfo");
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text.replace("{target}", &target)).unwrap();
            self
        }

        fn dm_uuid(&self, dev: &str, uuid: &str) -> &Self {
            let dir = self.system.path().join("sys/dev/block").join(dev).join("dm");
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("uuid"), format!("{uuid}\n")).unwrap();
            self
        }

        fn settings(&self, require_mountpoint: bool, require_luks: bool) -> TargetSettings {
            TargetSettings { path: self.target(), require_mountpoint, require_luks, marker_id: None }
        }
    }

    fn escape(s: &str) -> String {
        s.replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012")
    }

    const SD_ROOT: &str = "22 1 179:2 / / rw,noatime shared:1 - ext4 /dev/root rw\n";
    const LUKS_DRIVE: &str = "22 1 179:2 / / rw,noatime shared:1 - ext4 /dev/root rw\n\
                              45 22 254:0 / {target} rw,relatime shared:30 - ext4 /dev/mapper/datavault rw\n";

    fn not_ready(result: Result<TargetState>) -> String {
        match result {
            Ok(state) => panic!("target was accepted: {state:?}"),
            Err(e) => {
                assert_eq!(e.exit_code(), exit::TARGET_NOT_READY, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn mountinfo_lines_are_unescaped_and_optional_fields_skipped() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 8:17 / /media/my\\040drive\\011x\\012y\\134z rw shared:5 master:2 propagate_from:3 unbindable - vfat /dev/sdb1 ro\n\
                    41 22 0:50 / /run/user rw - tmpfs  rw\n";
        let mounts = parse_mountinfo(text).unwrap();
        assert_eq!(mounts.len(), 3);
        assert_eq!(
            mounts[0],
            MountEntry {
                mount_point: "/mnt/parent".into(),
                fs_root: "/mnt1".into(),
                major: 98,
                minor: 0,
                fstype: "ext3".into(),
                source: "/dev/root".into(),
                read_only: false,
            }
        );
        assert_eq!(mounts[1].mount_point, Path::new("/media/my drive\tx\ny\\z"));
        assert_eq!((mounts[1].major, mounts[1].minor), (8, 17));
        assert_eq!(mounts[1].fstype, "vfat");
        assert!(mounts[1].read_only, "superblock options say ro");
        assert_eq!(mounts[2].fstype, "tmpfs");
        assert_eq!(mounts[2].source, "", "an empty source keeps the fields aligned");
    }

    /// systemd's `ReadWritePaths=/mnt/datavault` bind-mounts the folder onto itself in the
    /// units' sandbox (mountinfo from datavault-drill.service on the Pi VM, #13).
    #[test]
    fn a_folder_bound_onto_itself_is_not_a_mount_point() {
        let fx = Fixture::new();
        // The drive is not mounted: only the SD card's folder, bound onto itself.
        fx.mountinfo(&format!(
            "{SD_ROOT}300 22 179:2 {{target}} {{target}} rw,relatime - ext4 /dev/root rw\n"
        ));
        let settings = fx.settings(true, true);
        let state = inspect(&settings, &fx.root()).unwrap();
        assert!(!state.is_mountpoint, "{state:?}");
        assert!(not_ready(require_readable(&settings, &fx.root())).contains("not a mount point"));
        assert!(not_ready(require_writable(&settings, &fx.root(), 0)).contains("not a mount point"));

        // The drive is mounted, and the sandbox binds it onto itself (read-only here: a
        // ProtectSystem=strict unit without ReadWritePaths= for it).
        fx.mountinfo(&format!(
            "{LUKS_DRIVE}301 45 254:0 / {{target}} ro,relatime - ext4 /dev/mapper/datavault rw\n"
        ))
        .dm_uuid("254:0", "CRYPT-LUKS2-0123456789abcdef-datavault");
        let state = inspect(&settings, &fx.root()).unwrap();
        assert!(state.is_mountpoint && state.luks.is_some(), "{state:?}");
        assert!(state.mount.as_ref().unwrap().read_only, "the bind's options are what a write meets");

        // A real bind of another folder (the drive mounted elsewhere, a folder of it bound
        // here) is a mount point.
        fx.mountinfo(&format!(
            "{SD_ROOT}46 22 254:0 / /media/usb rw - ext4 /dev/mapper/datavault rw\n\
             47 22 254:0 /backups {{target}} rw - ext4 /dev/mapper/datavault rw\n"
        ));
        assert!(inspect(&settings, &fx.root()).unwrap().is_mountpoint);
    }

    #[test]
    fn garbled_mountinfo_is_an_io_error_naming_the_line() {
        let fx = Fixture::new();
        fx.mountinfo(&format!("{SD_ROOT}45 22 254:0 / {{target}} rw,relatime ext4 /dev/mapper/x rw\n"));
        let e = inspect(&fx.settings(true, true), &fx.root()).unwrap_err();
        assert_eq!(e.exit_code(), exit::FAILURE);
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn unreadable_mountinfo_is_an_io_error() {
        let fx = Fixture::new();
        let e = inspect(&fx.settings(true, true), &fx.root()).unwrap_err();
        assert_eq!(e.exit_code(), exit::FAILURE);
        assert!(e.to_string().contains("proc/self/mountinfo"), "{e}");
    }

    #[test]
    fn the_longest_mount_point_wins_and_the_last_of_equals_is_on_top() {
        let fx = Fixture::new();
        let sub = fx.target().join("sub");
        fs::create_dir(&sub).unwrap();
        fx.mountinfo(&format!(
            "{SD_ROOT}\
             44 22 0:40 / {{target}}/su rw - tmpfs tmpfs rw\n\
             45 22 0:41 / {{target}} rw - autofs systemd-1 rw\n\
             46 45 254:0 / {{target}} rw,relatime - ext4 /dev/mapper/datavault rw\n"
        ))
        .dm_uuid("254:0", "CRYPT-LUKS2-0123456789abcdef-datavault");

        let state = inspect(&fx.settings(true, true), &fx.root()).unwrap();
        assert!(state.exists && state.is_mountpoint);
        let mount = state.mount.as_ref().unwrap();
        assert_eq!((mount.major, mount.minor, mount.fstype.as_str()), (254, 0, "ext4"));
        assert!(state.luks.is_some());
        assert!(state.total_bytes > 0);

        // `sub` is inside the drive: `su` is a sibling, not a prefix.
        let settings =
            TargetSettings { path: sub, require_mountpoint: false, require_luks: true, marker_id: None };
        let state = inspect(&settings, &fx.root()).unwrap();
        assert!(!state.is_mountpoint);
        assert_eq!(state.mount.as_ref().unwrap().mount_point, fx.target());
        assert!(state.problems(&settings).is_empty(), "{:?}", state.problems(&settings));
    }

    #[test]
    fn luks1_and_luks2_mappings_are_accepted() {
        for uuid in
            ["CRYPT-LUKS1-0123456789abcdef0123456789abcdef-datavault", "CRYPT-LUKS2-fedcba9876543210-usb"]
        {
            let fx = Fixture::new();
            fx.mountinfo(LUKS_DRIVE).dm_uuid("254:0", uuid);
            let settings = fx.settings(true, true);
            let state = require_writable(&settings, &fx.root(), 0).unwrap();
            assert_eq!(state.luks.as_deref(), Some(uuid));
            assert!(state.problems(&settings).is_empty());
            require_readable(&settings, &fx.root()).unwrap();
        }
    }

    #[test]
    fn plain_dm_crypt_lvm_and_bare_partitions_are_not_luks() {
        for uuid in ["CRYPT-PLAIN-datavault", "LVM-AbCdEf0123456789", "CRYPT-VERITY-x"] {
            let fx = Fixture::new();
            fx.mountinfo(LUKS_DRIVE).dm_uuid("254:0", uuid);
            let state = inspect(&fx.settings(true, true), &fx.root()).unwrap();
            assert_eq!(state.luks, None, "{uuid}");
            let m = not_ready(require_writable(&fx.settings(true, true), &fx.root(), 0));
            assert!(m.contains("/dev/mapper/datavault (ext4)") && m.contains("cryptsetup"), "{m}");
        }

        let fx = Fixture::new();
        fx.mountinfo(&format!("{SD_ROOT}50 22 8:1 / {{target}} rw - ext4 /dev/sda1 rw\n"));
        let m = not_ready(require_writable(&fx.settings(true, true), &fx.root(), 0));
        assert!(
            m.contains(&format!(
                "target {}: is mounted from /dev/sda1 (ext4), which is not a LUKS",
                fx.target().display()
            )),
            "{m}"
        );
        assert!(m.contains("target.require_luks = false"), "{m}");
        // Reading an old plain drive is allowed: the archives are age-encrypted anyway.
        require_readable(&fx.settings(true, true), &fx.root()).unwrap();
        require_writable(&fx.settings(true, false), &fx.root(), 0).unwrap();
    }

    #[test]
    fn a_folder_on_the_sd_card_is_refused_when_a_mount_point_is_required() {
        let fx = Fixture::new();
        fx.mountinfo(SD_ROOT);
        let state = inspect(&fx.settings(true, true), &fx.root()).unwrap();
        assert!(state.exists && !state.is_mountpoint);
        assert_eq!(state.mount.as_ref().unwrap().source, "/dev/root");

        let problems = state.problems(&fx.settings(true, true));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("is not a mount point"), "mounting comes first: {problems:?}");
        assert!(problems[1].contains("is on /dev/root (ext4, mounted at /)"), "{problems:?}");

        let m = not_ready(require_writable(&fx.settings(true, false), &fx.root(), 0));
        assert!(
            m.contains("fill the SD card") && m.contains(&format!("`mount {}`", fx.target().display())),
            "{m}"
        );
        let m = not_ready(require_readable(&fx.settings(true, false), &fx.root()));
        assert!(m.contains("is not a mount point") && m.contains("cannot be seen"), "{m}");

        require_writable(&fx.settings(false, false), &fx.root(), 0).unwrap();
        require_readable(&fx.settings(false, false), &fx.root()).unwrap();
        assert!(state.problems(&fx.settings(false, false)).is_empty());
    }

    #[test]
    fn a_missing_folder_is_reported_not_failed() {
        let fx = Fixture::new();
        fx.mountinfo(LUKS_DRIVE);
        let missing = fx.target().join("absent");
        for require in [true, false] {
            let settings = TargetSettings {
                path: missing.clone(),
                require_mountpoint: require,
                require_luks: require,
                marker_id: None,
            };
            let state = inspect(&settings, &fx.root()).unwrap();
            assert!(!state.exists && state.mount.is_none() && state.free_bytes == 0);
            assert_eq!(state.problems(&settings).len(), 1);
            let m = not_ready(require_writable(&settings, &fx.root(), 0));
            assert!(m.contains("absent: does not exist; plug in the USB drive"), "{m}");
            not_ready(require_readable(&settings, &fx.root()));
        }

        let file = fx.target().join("file");
        fs::write(&file, "x").unwrap();
        for path in [file.clone(), file.join("below")] {
            let settings =
                TargetSettings { path, require_mountpoint: false, require_luks: false, marker_id: None };
            let state = inspect(&settings, &fx.root()).unwrap();
            assert!(!state.exists);
            let m = not_ready(require_readable(&settings, &fx.root()));
            assert!(m.contains("is not a folder") || m.contains("does not exist"), "{m}");
        }
    }

    #[test]
    fn too_little_free_space_is_refused_with_both_sizes() {
        let fx = Fixture::new();
        fx.mountinfo(LUKS_DRIVE).dm_uuid("254:0", "CRYPT-LUKS2-abc-datavault");
        let m = not_ready(require_writable(&fx.settings(true, true), &fx.root(), u64::MAX));
        assert!(m.contains("free but the archive needs about 16.0 EiB; run `datavault prune`"), "{m}");
    }

    #[test]
    fn a_read_only_drive_may_be_read_but_not_written() {
        let fx = Fixture::new();
        fx.mountinfo(&format!(
            "{SD_ROOT}45 22 254:0 / {{target}} rw,relatime - ext4 /dev/mapper/datavault ro,errors=remount-ro\n"
        ))
        .dm_uuid("254:0", "CRYPT-LUKS2-abc-datavault");
        let m = not_ready(require_writable(&fx.settings(true, true), &fx.root(), 0));
        assert!(m.contains("read-only mount (/dev/mapper/datavault at") && m.contains("fsck"), "{m}");
        require_readable(&fx.settings(true, true), &fx.root()).unwrap();
    }

    #[test]
    fn human_bytes_uses_binary_units_with_one_decimal() {
        for (n, expect) in [
            (0, "0 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (8_493_465, "8.1 MiB"),
            (1_288_490_189, "1.2 GiB"),
            (1024 * 1024 - 1, "1.0 MiB"),
            (u64::MAX, "16.0 EiB"),
        ] {
            assert_eq!(human_bytes(n), expect, "{n}");
        }
    }

    /// Unmounts on drop, so a failing assertion does not leave a tmpfs behind.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn a_real_tmpfs_mount_point_is_seen_by_the_real_system() {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: needs root");
            return;
        }
        // Declared before the guard, so the guard unmounts before the folder is removed.
        let dir = tempfile::tempdir().unwrap();
        let mount_point = fs::canonicalize(dir.path()).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mount_point)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        let _unmount = Unmount(mount_point.clone());

        let settings = TargetSettings {
            path: mount_point.clone(),
            require_mountpoint: true,
            require_luks: false,
            marker_id: None,
        };
        let state = inspect(&settings, &SystemRoot::real()).unwrap();
        assert!(state.exists && state.is_mountpoint, "{state:?}");
        assert_eq!(state.mount.as_ref().unwrap().fstype, "tmpfs");
        assert_eq!(state.luks, None);
        assert_eq!(state.total_bytes, 1024 * 1024);

        let m = not_ready(require_writable(&settings, &SystemRoot::real(), 2 * 1024 * 1024));
        assert!(m.contains("needs about 2.0 MiB"), "{m}");
        require_writable(&settings, &SystemRoot::real(), 100 * 1024).unwrap();
        require_readable(&settings, &SystemRoot::real()).unwrap();

        let luks = TargetSettings { require_luks: true, ..settings };
        let m = not_ready(require_writable(&luks, &SystemRoot::real(), 0));
        assert!(m.contains("is mounted from tmpfs (tmpfs), which is not a LUKS"), "{m}");
    }
}
