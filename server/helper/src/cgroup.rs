//! Per-sandbox cgroups on v1 (memory, pids, cpu, cpuacct hierarchies) and v2 (unified).
//!
//! Layout: a parent named after the state directory (`sandboxd.<hash>`, so several daemons on one
//! host never touch each other's cgroups) and one child per sandbox named by its UUID:
//!
//! ```text
//! v1:  <memory mount>/sandboxd.<hash>/<uuid>   (and the same under pids, cpu, cpuacct)
//! v2:  <cgroup2 mount>/sandboxd.<hash>/<uuid>
//! ```
//!
//! Everything is plain file I/O below a root that tests replace with a fake cgroupfs directory,
//! which is how the v2 code is exercised on a v1 host. (cgroups-rs, the obvious crate, cannot be
//! pointed at another root, and its current version pulls a D-Bus stack into this root process;
//! what is needed here is a dozen file writes.)

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use sandboxd_protocol::wire::{SandboxStats, SpawnLimits};
use uuid::Uuid;

/// CPU bandwidth period: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("creating cgroup {path}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {file}")]
    Write {
        file: String,
        source: std::io::Error,
    },
    #[error("the {0} limit cannot be enforced on this host")]
    Unenforceable(&'static str),
}

/// How cgroups are mounted on this host, and where our parent lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Separate hierarchies; `None` for a controller that is not mounted. `cpu` and `cpuacct`
    /// may be the same directory (co-mounted).
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
    },
    /// The unified hierarchy: the directory under which our parent is created, and the
    /// controllers enabled for its children.
    V2 {
        base: PathBuf,
        controllers: Vec<String>,
    },
    None,
}

/// One cgroup mount of a mountinfo text.
pub struct CgroupMount<'a> {
    pub mount_point: &'a str,
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: &'a str,
    pub super_opts: Vec<&'a str>,
}

/// The cgroup and cgroup2 mounts listed in a mountinfo text.
pub fn cgroup_mounts(mountinfo: &str) -> impl Iterator<Item = CgroupMount<'_>> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        let mut fields = right.split_whitespace();
        let fstype = fields.next()?;
        let super_opts = fields.nth(1).unwrap_or("").split(',').collect();
        matches!(fstype, "cgroup" | "cgroup2").then_some(CgroupMount {
            mount_point,
            fstype,
            super_opts,
        })
    })
}

impl Layout {
    /// Read the layout from a mountinfo text.
    pub fn from_mountinfo(mountinfo: &str) -> Layout {
        let mut v1 = (None, None, None, None);
        let mut unified = None;
        for CgroupMount {
            mount_point,
            fstype,
            super_opts,
        } in cgroup_mounts(mountinfo)
        {
            match fstype {
                "cgroup2" if mount_point == "/sys/fs/cgroup" => {
                    unified = Some(PathBuf::from(mount_point))
                }
                "cgroup" => {
                    let p = || Some(PathBuf::from(mount_point));
                    if super_opts.contains(&"memory") {
                        v1.0 = p();
                    }
                    if super_opts.contains(&"pids") {
                        v1.1 = p();
                    }
                    if super_opts.contains(&"cpu") {
                        v1.2 = p();
                    }
                    if super_opts.contains(&"cpuacct") {
                        v1.3 = p();
                    }
                }
                _ => {}
            }
        }
        if let Some(base) = unified {
            return Layout::V2 {
                base,
                controllers: Vec::new(),
            };
        }
        match v1 {
            (None, None, None, None) => Layout::None,
            (memory, pids, cpu, cpuacct) => Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            },
        }
    }
}

/// The sandboxes' parent cgroup(s), created at helper start.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    parent: String,
    /// Why nothing is enforceable, when that is the case.
    pub unavailable: Option<String>,
    /// Why some limits are not enforceable (a controller missing), when that is the case.
    note: Option<String>,
}

/// The v2 controllers the helper enables for sandboxes.
const WANTED_V2: [&str; 3] = ["memory", "pids", "cpu"];

/// The leaf a rootless helper moves the processes of its delegated cgroup into: a cgroup with
/// processes cannot enable controllers for its children (the "no internal processes" rule).
pub const DELEGATED_LEAF: &str = "sandboxd-daemon";

/// How a user gives a rootless daemon a cgroup subtree of its own.
pub const DELEGATION_FIX: &str = "a delegated cgroup: start sandboxd under `systemd-run --user \
    --scope -p Delegate=yes sandboxd ...` or as the user unit deploy/sandboxd-user.service \
    (Delegate=yes)";

/// The helper's cgroup in the unified hierarchy: the `0::/path` line of `/proc/self/cgroup`.
pub fn own_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// Take over the v2 subtree the rootless helper runs in, when it is delegated to it: move every
/// process of it into [`DELEGATED_LEAF`] (the daemon and the helper), so that the subtree's root
/// may enable controllers for the sandboxes' cgroups. Returns the subtree's root. A helper that
/// restarts finds itself in the leaf already, and manages the leaf's parent again.
fn delegate(mount: &Path, own_cgroup: &str) -> Result<PathBuf, String> {
    let own = own_v2_path(own_cgroup).ok_or_else(|| {
        format!("the helper's cgroup is not in the unified hierarchy; rootless limits need {DELEGATION_FIX}")
    })?;
    let mut root = mount.join(own.trim_start_matches('/'));
    if root.file_name().is_some_and(|n| n == DELEGATED_LEAF) {
        root.pop();
    }
    let writable = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
    if !(writable(&root)
        && writable(&root.join("cgroup.procs"))
        && writable(&root.join("cgroup.subtree_control")))
    {
        return Err(format!(
            "the helper's cgroup {} is not delegated to uid {}; rootless limits need {DELEGATION_FIX}",
            root.display(),
            nix::unistd::geteuid()
        ));
    }
    // Only the daemon and the helper may be there: a cgroup that holds other processes (a
    // terminal's scope of the user's systemd, say) is not the daemon's to take over.
    let procs_file = root.join("cgroup.procs");
    let procs = fs::read_to_string(&procs_file)
        .map_err(|e| format!("reading {}: {e}", procs_file.display()))?;
    let ours = [
        nix::unistd::getpid().to_string(),
        nix::unistd::getppid().to_string(),
    ];
    if let Some(other) = procs
        .split_whitespace()
        .find(|p| !ours.iter().any(|o| o == p))
    {
        return Err(format!(
            "the helper's cgroup {} also holds other processes (pid {other}), so it is not \
             delegated to sandboxd alone; rootless limits need {DELEGATION_FIX}",
            root.display()
        ));
    }
    let leaf = root.join(DELEGATED_LEAF);
    mkdir(&leaf).map_err(|e| e.to_string())?;
    // Processes may fork while they are moved: a few rounds until the root is empty.
    for _ in 0..20 {
        let procs = fs::read_to_string(root.join("cgroup.procs"))
            .map_err(|e| format!("reading {}: {e}", root.join("cgroup.procs").display()))?;
        if procs.trim().is_empty() {
            return Ok(root);
        }
        for pid in procs.split_whitespace() {
            match write(&leaf.join("cgroup.procs"), pid) {
                Ok(()) => {}
                // Gone in between.
                Err(CgroupError::Write { source, .. })
                    if source.raw_os_error() == Some(nix::libc::ESRCH) => {}
                Err(e) => return Err(format!("moving pid {pid} into {}: {e}", leaf.display())),
            }
        }
    }
    Err(format!(
        "processes keep appearing in {}; cannot empty it to enable controllers",
        root.display()
    ))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            file: path.display().to_string(),
            source,
        })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.events, cpu.stat, memory.oom_control...).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl Cgroups {
    /// Set up the parent cgroups. Never fails: what cannot be set up is reported as not
    /// enforceable, and the daemon answers 422 for those limits. `own_cgroup` is the helper's
    /// `/proc/self/cgroup`: a rootless helper manages the v2 subtree it was started in, when that
    /// subtree is delegated to it.
    pub fn setup(layout: Layout, parent: String, privileged: bool, own_cgroup: &str) -> Cgroups {
        let mut cgroups = Cgroups {
            layout,
            parent,
            unavailable: None,
            note: None,
        };
        if !privileged {
            let delegated = match &cgroups.layout {
                Layout::V2 { base, .. } => delegate(base, own_cgroup),
                Layout::V1 { .. } => Err(format!(
                    "this host mounts cgroup v1 (or hybrid) hierarchies, which cannot be \
                     delegated to an unprivileged user; rootless limits need the unified \
                     hierarchy (cgroup v2, boot with systemd.unified_cgroup_hierarchy=1) and \
                     {DELEGATION_FIX}"
                )),
                Layout::None => Err("no cgroup hierarchy is mounted".to_string()),
            };
            match delegated {
                Ok(root) => {
                    cgroups.layout = Layout::V2 {
                        base: root,
                        controllers: Vec::new(),
                    }
                }
                Err(why) => {
                    cgroups.unavailable = Some(why);
                    cgroups.layout = Layout::None;
                    return cgroups;
                }
            }
        }
        let result = match &mut cgroups.layout {
            Layout::None => Err("no cgroup hierarchy is mounted".to_string()),
            Layout::V1 { .. } => {
                let dirs = cgroups.v1_dirs(None);
                dirs.iter()
                    .try_for_each(|d| mkdir(d))
                    .map_err(|e| e.to_string())
            }
            Layout::V2 { base, controllers } => {
                let available =
                    fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
                let wanted: Vec<String> = WANTED_V2
                    .into_iter()
                    .filter(|c| available.split_whitespace().any(|a| a == *c))
                    .map(str::to_owned)
                    .collect();
                let missing: Vec<&str> = WANTED_V2
                    .into_iter()
                    .filter(|c| !wanted.iter().any(|w| w == c))
                    .collect();
                if !missing.is_empty() {
                    cgroups.note = Some(if privileged {
                        format!(
                            "the {} controller(s) are not available in {} (see deploy/cgroups.md)",
                            missing.join(", "),
                            base.display()
                        )
                    } else {
                        format!(
                            "the {} controller(s) are not delegated to {} (systemd delegates \
                             memory, cpu and pids with Delegate=yes; a delegating parent enables \
                             them in its cgroup.subtree_control)",
                            missing.join(", "),
                            base.display()
                        )
                    });
                }
                let parent = base.join(&cgroups.parent);
                let enable = wanted
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let r = write(&base.join("cgroup.subtree_control"), &enable)
                    .and_then(|()| mkdir(&parent))
                    .and_then(|()| write(&parent.join("cgroup.subtree_control"), &enable));
                match r {
                    Ok(()) => {
                        *controllers = wanted;
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        if let Err(why) = result {
            cgroups.unavailable = Some(why);
            cgroups.layout = Layout::None;
        }
        cgroups
    }

    /// Why the limits this host does not enforce are missing, with the fix, if any is missing.
    pub fn why_unenforceable(&self) -> Option<String> {
        self.unavailable.clone().or_else(|| self.note.clone())
    }

    /// Limits this host enforces, as the API names them.
    pub fn enforceable(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.layout {
            Layout::V1 {
                memory, pids, cpu, ..
            } => {
                if memory.is_some() {
                    out.push("memory".into());
                }
                if cpu.is_some() {
                    out.push("cpus".into());
                }
                if pids.is_some() {
                    out.push("pids".into());
                }
            }
            Layout::V2 { controllers, .. } => {
                for (c, name) in [("memory", "memory"), ("cpu", "cpus"), ("pids", "pids")] {
                    if controllers.iter().any(|x| x == c) {
                        out.push(name.into());
                    }
                }
            }
            Layout::None => {}
        }
        out
    }

    /// The directory the daemon's parent cgroup is in, on v2 (the root, or a delegated subtree).
    pub fn v2_base(&self) -> Option<&Path> {
        match &self.layout {
            Layout::V2 { base, .. } => Some(base),
            _ => None,
        }
    }

    pub fn is_v2(&self) -> bool {
        matches!(self.layout, Layout::V2 { .. })
    }

    pub fn is_active(&self) -> bool {
        !matches!(self.layout, Layout::None)
    }

    /// The parent (`id` None) or a sandbox's directories, one per v1 hierarchy (deduplicated).
    fn v1_dirs(&self, id: Option<Uuid>) -> Vec<PathBuf> {
        let Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = &self.layout
        else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for mount in [memory, pids, cpu, cpuacct].into_iter().flatten() {
            let mut d = mount.join(&self.parent);
            if let Some(id) = id {
                d.push(id.to_string());
            }
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs
    }

    fn dirs(&self, id: Uuid) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1 { .. } => self.v1_dirs(Some(id)),
            Layout::V2 { .. } => self.v2_dir(id).into_iter().collect(),
            Layout::None => Vec::new(),
        }
    }

    /// A sandbox's directory in the unified hierarchy (v2 only).
    fn v2_dir(&self, id: Uuid) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2 { base, .. } => Some(base.join(&self.parent).join(id.to_string())),
            _ => None,
        }
    }

    /// Whether a sandbox has a cgroup (in any hierarchy).
    pub fn exists(&self, id: Uuid) -> bool {
        self.dirs(id).iter().any(|d| d.exists())
    }

    fn v1_dir(&self, controller: &str, id: Uuid) -> Option<PathBuf> {
        let Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = &self.layout
        else {
            return None;
        };
        let mount = match controller {
            "memory" => memory,
            "pids" => pids,
            "cpu" => cpu,
            "cpuacct" => cpuacct,
            _ => &None,
        };
        mount
            .as_ref()
            .map(|m| m.join(&self.parent).join(id.to_string()))
    }

    /// Create a sandbox's cgroup with its limits. Refuses a limit it cannot enforce.
    pub fn create(&self, id: Uuid, limits: &SpawnLimits) -> Result<(), CgroupError> {
        let enforceable = self.enforceable();
        for (set, name) in [
            (limits.memory_bytes.is_some(), "memory"),
            (limits.cpu_millis.is_some(), "cpus"),
            (limits.pids.is_some(), "pids"),
        ] {
            if set && !enforceable.iter().any(|e| e == name) {
                return Err(CgroupError::Unenforceable(name));
            }
        }
        let result = (|| {
            for d in &self.dirs(id) {
                mkdir(d)?;
            }
            match &self.layout {
                Layout::V1 { .. } => self.limit_v1(id, limits),
                Layout::V2 { .. } => self.v2_dir(id).map_or(Ok(()), |d| limit_v2(&d, limits)),
                Layout::None => Ok(()),
            }
        })();
        if result.is_err() {
            self.remove(id);
        }
        result
    }

    fn limit_v1(&self, id: Uuid, limits: &SpawnLimits) -> Result<(), CgroupError> {
        if let (Some(bytes), Some(dir)) = (limits.memory_bytes, self.v1_dir("memory", id)) {
            write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
            // With swap accounting, memory+swap gets the same limit: no escaping into swap.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &bytes.to_string())?;
            }
        }
        if let (Some(n), Some(dir)) = (limits.pids, self.v1_dir("pids", id)) {
            write(&dir.join("pids.max"), &n.to_string())?;
        }
        if let (Some(millis), Some(dir)) = (limits.cpu_millis, self.v1_dir("cpu", id)) {
            write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            let quota = (u64::from(millis) * CPU_PERIOD_US / 1000).max(1000);
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(())
    }

    /// Live (or final, just before removal) figures from the cgroup. Output and disk figures are
    /// filled in by the caller.
    pub fn stats(&self, id: Uuid) -> SandboxStats {
        let mut s = SandboxStats::default();
        match &self.layout {
            Layout::V1 { .. } => {
                if let Some(d) = self.v1_dir("memory", id) {
                    s.memory_bytes = read_u64(&d.join("memory.usage_in_bytes"));
                    s.memory_peak_bytes = read_u64(&d.join("memory.max_usage_in_bytes"));
                }
                if let Some(d) = self.v1_dir("cpuacct", id) {
                    s.cpu_usec = read_u64(&d.join("cpuacct.usage")).map(|ns| ns / 1000);
                }
                if let Some(d) = self.v1_dir("pids", id) {
                    s.pids = read_u64(&d.join("pids.current"));
                    s.pids_peak = read_u64(&d.join("pids.peak"));
                }
            }
            Layout::V2 { .. } => {
                let Some(d) = self.v2_dir(id) else { return s };
                s.memory_bytes = read_u64(&d.join("memory.current"));
                s.memory_peak_bytes = read_u64(&d.join("memory.peak"));
                s.cpu_usec = read_key(&d.join("cpu.stat"), "usage_usec");
                s.pids = read_u64(&d.join("pids.current"));
                s.pids_peak = read_u64(&d.join("pids.peak"));
            }
            Layout::None => {}
        }
        s
    }

    /// How many times the kernel's OOM killer struck in the sandbox's cgroup.
    pub fn oom_kills(&self, id: Uuid) -> u64 {
        match &self.layout {
            Layout::V1 { .. } => self
                .v1_dir("memory", id)
                .and_then(|d| read_key(&d.join("memory.oom_control"), "oom_kill"))
                .unwrap_or(0),
            Layout::V2 { .. } => self
                .v2_dir(id)
                .and_then(|d| read_key(&d.join("memory.events"), "oom_kill"))
                .unwrap_or(0),
            Layout::None => 0,
        }
    }

    /// The file whose changes signal an OOM kill: poll it for POLLPRI (v2 memory.events), or
    /// register it with cgroup.event_control (v1 memory.oom_control).
    pub fn oom_event_files(&self, id: Uuid) -> Option<(PathBuf, Option<PathBuf>)> {
        match &self.layout {
            Layout::V1 { .. } => self.v1_dir("memory", id).map(|d| {
                (
                    d.join("memory.oom_control"),
                    Some(d.join("cgroup.event_control")),
                )
            }),
            Layout::V2 { .. } => self.v2_dir(id).map(|d| (d.join("memory.events"), None)),
            Layout::None => None,
        }
    }

    /// Kill whatever still runs in a sandbox's cgroup and remove it (best effort, idempotent).
    pub fn remove(&self, id: Uuid) {
        for dir in self.dirs(id) {
            remove_dir(&dir);
        }
    }

    /// Remove the daemon's parent cgroups if no sandbox's cgroup is left in them (when the
    /// helper stops). rmdir of a cgroup with children fails, so a running sandbox keeps them.
    pub fn release_parents_if_empty(&self) {
        let parents: Vec<PathBuf> = match &self.layout {
            Layout::V1 { .. } => self.v1_dirs(None),
            Layout::V2 { base, .. } => vec![base.join(&self.parent)],
            Layout::None => Vec::new(),
        };
        for parent in parents {
            let _ = fs::remove_dir(parent);
        }
    }

    /// Sandbox ids that have a cgroup (to find orphans).
    pub fn list(&self) -> Vec<Uuid> {
        let parents: Vec<PathBuf> = match &self.layout {
            Layout::V1 { .. } => self.v1_dirs(None),
            Layout::V2 { base, .. } => vec![base.join(&self.parent)],
            Layout::None => Vec::new(),
        };
        let mut ids: Vec<Uuid> = parents
            .iter()
            .filter_map(|p| fs::read_dir(p).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| Uuid::parse_str(&e.file_name().to_string_lossy()).ok())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The v2 directory of a sandbox, opened for CLONE_INTO_CGROUP.
    pub fn open_for_clone(&self, id: Uuid) -> Option<OwnedFd> {
        fs::File::open(self.v2_dir(id)?).ok().map(OwnedFd::from)
    }

    /// `cgroup.procs` files to write a pid into (v1, where CLONE_INTO_CGROUP does not exist).
    pub fn procs_files(&self, id: Uuid) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1 { .. } => self
                .v1_dirs(Some(id))
                .into_iter()
                .map(|d| d.join("cgroup.procs"))
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn limit_v2(dir: &Path, limits: &SpawnLimits) -> Result<(), CgroupError> {
    if let Some(bytes) = limits.memory_bytes {
        write(&dir.join("memory.max"), &bytes.to_string())?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        // The whole sandbox goes when the OOM killer strikes, not one process of it.
        write(&dir.join("memory.oom.group"), "1")?;
    }
    if let Some(n) = limits.pids {
        write(&dir.join("pids.max"), &n.to_string())?;
    }
    if let Some(millis) = limits.cpu_millis {
        let quota = (u64::from(millis) * CPU_PERIOD_US / 1000).max(1000);
        write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(())
}

/// Kill what runs in a cgroup directory, then remove it.
fn remove_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        let _ = write(&kill, "1");
    } else {
        // v1: no cgroup.kill. Stray processes are rare (the sandbox's pid namespace dies with
        // its init), but a crashed monitor may leave some: kill what is listed, a few rounds.
        for _ in 0..10 {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // Busy while killed processes are being reaped.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// A short, stable name for the parent cgroup of the daemon using `state_dir`.
pub fn parent_name(state_dir: &Path) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("sandboxd.{:012x}", hash & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_v2(controllers: &str) -> (PathBuf, Cgroups) {
        let root = std::env::temp_dir().join(format!(
            "sandboxd-cgv2-{}-{}",
            std::process::id(),
            Uuid::new_v4().simple()
        ));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("cgroup.controllers"), controllers).unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        // A fake cgroupfs does not create the interface files of new directories.
        fs::create_dir(root.join("sandboxd.test")).unwrap();
        fs::write(
            root.join("sandboxd.test").join("cgroup.subtree_control"),
            "",
        )
        .unwrap();
        let layout = Layout::V2 {
            base: root.clone(),
            controllers: Vec::new(),
        };
        let cgroups = Cgroups::setup(layout, "sandboxd.test".into(), true, "0::/\n");
        (root, cgroups)
    }

    fn limits() -> SpawnLimits {
        SpawnLimits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            pids: Some(32),
            output_bytes: 1 << 20,
            disk_bytes: None,
        }
    }

    #[test]
    fn v2_writes_limits_into_the_sandbox_cgroup() {
        let (root, cgroups) = fake_v2("cpuset cpu io memory pids");
        assert_eq!(cgroups.unavailable, None);
        assert_eq!(cgroups.enforceable(), vec!["memory", "cpus", "pids"]);
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        let id = Uuid::new_v4();
        let dir = root.join("sandboxd.test").join(id.to_string());
        fs::create_dir_all(&dir).unwrap();
        for f in [
            "memory.max",
            "memory.oom.group",
            "pids.max",
            "cpu.max",
            "memory.swap.max",
        ] {
            fs::write(dir.join(f), "").unwrap();
        }
        cgroups.create(id, &limits()).unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.max"), "50000 100000");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(cgroups.oom_kills(id), 1);
        fs::write(dir.join("cpu.stat"), "usage_usec 1234\nuser_usec 1000\n").unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        fs::write(dir.join("pids.peak"), "7\n").unwrap();
        let s = cgroups.stats(id);
        assert_eq!(
            (s.cpu_usec, s.memory_bytes, s.pids_peak, s.pids),
            (Some(1234), Some(4096), Some(7), None)
        );
        assert_eq!(cgroups.list(), vec![id]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_without_a_controller_refuses_that_limit() {
        let (root, cgroups) = fake_v2("cpu pids");
        assert_eq!(cgroups.enforceable(), vec!["cpus", "pids"]);
        let err = cgroups.create(Uuid::new_v4(), &limits()).unwrap_err();
        assert!(matches!(err, CgroupError::Unenforceable("memory")), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn layouts_are_read_from_mountinfo() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      31 25 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
                      33 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                      32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::from_mountinfo(hybrid);
        assert_eq!(
            layout,
            Layout::V1 {
                memory: Some("/sys/fs/cgroup/memory".into()),
                pids: Some("/sys/fs/cgroup/pids".into()),
                cpu: Some("/sys/fs/cgroup/cpu,cpuacct".into()),
                cpuacct: Some("/sys/fs/cgroup/cpu,cpuacct".into()),
            }
        );
        let cg = Cgroups {
            layout,
            parent: "p".into(),
            unavailable: None,
            note: None,
        };
        // cpu and cpuacct co-mounted: one directory, not two.
        assert_eq!(cg.v1_dirs(None).len(), 3);
        let v2 = "40 25 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(matches!(Layout::from_mountinfo(v2), Layout::V2 { .. }));
        assert_eq!(Layout::from_mountinfo(""), Layout::None);
    }

    #[test]
    fn rootless_enforces_nothing_and_says_why() {
        let cg = Cgroups::setup(Layout::from_mountinfo(""), "p".into(), false, "0::/\n");
        assert!(cg.enforceable().is_empty());
        assert!(cg.unavailable.is_some());
        let v1 = "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let cg = Cgroups::setup(Layout::from_mountinfo(v1), "p".into(), false, "0::/\n");
        assert!(cg.enforceable().is_empty());
        let why = cg.why_unenforceable().unwrap();
        assert!(
            why.contains("cgroup v2") && why.contains("Delegate=yes"),
            "{why}"
        );
    }

    #[test]
    fn rootless_takes_over_its_delegated_subtree_and_its_leaf_after_a_restart() {
        // A fake delegated subtree `user.slice/u/app` (the process list is empty: a fake cgroupfs
        // moves nothing).
        let (root, _) = fake_v2("memory pids");
        let delegated = root.join("user.slice/u/app");
        fs::create_dir_all(delegated.join(DELEGATED_LEAF)).unwrap();
        for f in ["cgroup.procs", "cgroup.subtree_control"] {
            fs::write(delegated.join(f), "").unwrap();
        }
        fs::write(delegated.join("cgroup.controllers"), "memory pids\n").unwrap();
        fs::create_dir(delegated.join("p")).unwrap();
        fs::write(delegated.join("p/cgroup.subtree_control"), "").unwrap();
        let layout = Layout::V2 {
            base: root.clone(),
            controllers: Vec::new(),
        };
        for own in [
            "0::/user.slice/u/app\n",
            "0::/user.slice/u/app/sandboxd-daemon\n",
        ] {
            let cg = Cgroups::setup(layout.clone(), "p".into(), false, own);
            assert_eq!(cg.unavailable, None, "{own}");
            assert_eq!(cg.enforceable(), vec!["memory", "pids"]);
            let why = cg.why_unenforceable().unwrap();
            assert!(
                why.contains("cpu") && why.contains("not delegated"),
                "{why}"
            );
            assert_eq!(
                fs::read_to_string(delegated.join("cgroup.subtree_control")).unwrap(),
                "+memory +pids"
            );
            let id = Uuid::new_v4();
            assert_eq!(
                cg.v2_dir(id).unwrap(),
                delegated.join("p").join(id.to_string())
            );
        }
        // A subtree that holds another process is not taken over.
        fs::write(delegated.join("cgroup.procs"), "1\n").unwrap();
        let cg = Cgroups::setup(layout, "p".into(), false, "0::/user.slice/u/app\n");
        assert!(cg.enforceable().is_empty());
        let why = cg.unavailable.unwrap();
        assert!(why.contains("other processes (pid 1)"), "{why}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn own_cgroup_is_read_from_proc_self_cgroup() {
        assert_eq!(
            own_v2_path("12:pids:/x\n0::/user.slice/a.service\n"),
            Some("/user.slice/a.service")
        );
        assert_eq!(own_v2_path("12:pids:/x\n"), None);
    }

    #[test]
    fn parent_names_are_stable_and_distinct() {
        assert_eq!(
            parent_name(Path::new("/var/lib/sandboxd")),
            parent_name(Path::new("/var/lib/sandboxd"))
        );
        assert_ne!(parent_name(Path::new("/a")), parent_name(Path::new("/b")));
        assert!(parent_name(Path::new("/a")).starts_with("sandboxd."));
    }
}
