//! The sandbox's root filesystem, built inside its own mount namespace, as a plan: [`plan`] turns
//! the spec and a few facts about the host into a list of [`MountOp`]s (pure, no system call, so
//! the layout is tested without root), and [`apply`] is the only function here that mounts. As
//! bubblewrap's privileged operation list, the plan is a closed set of operations; its text
//! rendering (its `Display`) is what the golden tests compare.
//!
//! "Host" mode: a tmpfs becomes the new root. It receives read-only binds of the host's /usr (and
//! /bin, /sbin, /lib* as links or binds, whatever the host has), an /etc of its own with a few host
//! files that programs need bound read-only (never shadow, ssh keys, sudoers...), a fresh /proc
//! with the dangerous files masked, a minimal /dev, tmpfs /tmp, /root and /run, and the sandbox's
//! work directory at /work. Then `pivot_root` and a lazy unmount of the old root leave nothing of
//! the host's mount table behind, and the root itself is made read-only.
//!
//! "Image" mode: the root is an overlay of the sandbox's upper layer on the image
//! ([`open_image_layers`], [`mount_image_root`]); the same /work, /tmp, /run, /dev and /proc go
//! on top, and /etc gets the files that describe this sandbox.
//!
//! Paths in the plan are the sandbox's own (`/dev/pts`). Before the pivot, [`apply`] reaches them
//! under the new root, a tmpfs mounted on the host's /tmp *inside the new mount namespace only*:
//! the host's /tmp is untouched, and the work directory is reached through an already-open
//! descriptor, so hiding the host's /tmp hides nothing we need.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sys::stat::fstat;
use nix::NixPath;

use sandboxd_protocol::layout::{OVERLAY_WORK_DIR, TMP_DIR, UPPER_DIR, WORK_OVERLAY_DIR};

use super::{step, ImageLower, SetupError};
use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::validate::{IdMap, Rootfs, ValidNet, ValidSpawn};

const NEW_ROOT: &str = "/tmp";

/// Host directories shared read-only, as a link when the host has a link (merged /usr).
const HOST_TREES: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host files under /etc that programs need and that hold no secrets.
const HOST_ETC: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "environment",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "login.defs",
    "lsb-release",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "perl",
    "pki",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "python3.11",
    "rpc",
    "services",
    "shells",
    "ssl",
    "terminfo",
    "timezone",
    "xattr.conf",
];

/// Files of /proc that reveal or change host state: hidden behind /dev/null. Docker's default
/// set first; then host kernel and hardware facts no sandboxed program needs (the kernel's boot
/// line, its symbols, modules and configuration, physical memory and I/O maps, page and slab
/// internals, the host's disks and swap, devices, interrupts, and every process's file locks).
/// What ordinary tools read (`meminfo`, `cpuinfo`, `stat`, `loadavg`, `uptime`, `vmstat`) stays.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "timer_stats",
    "cmdline",
    "kallsyms",
    "modules",
    "config.gz",
    "kmsg",
    "iomem",
    "ioports",
    "vmallocinfo",
    "slabinfo",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "buddyinfo",
    "pagetypeinfo",
    "zoneinfo",
    "partitions",
    "diskstats",
    "swaps",
    "devices",
    "interrupts",
    "softirqs",
    "locks",
    "mtrr",
    "dma",
];
/// Directories of /proc hidden behind an empty read-only tmpfs.
const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound"];
/// Parts of /proc kept but read-only.
const PROC_READONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];

const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What a host path is, as [`HostFacts::probe`] found it (a missing path has no entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A symbolic link to this destination: reproduced as a link (merged /usr).
    Link(PathBuf),
    Dir,
    File,
}

/// The host paths a host-mode root shares: which of [`HOST_TREES`] and [`HOST_ETC`] exist, and
/// what they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub trees: Vec<(&'static str, HostEntry)>,
    pub etc: Vec<(&'static str, HostEntry)>,
}

impl HostFacts {
    /// Look at the host's root (`/`).
    pub fn probe() -> Result<Self, SetupError> {
        Self::probe_at(Path::new("/"))
    }

    /// Look at the tree under `root` (a test's temporary directory, or `/`).
    pub fn probe_at(root: &Path) -> Result<Self, SetupError> {
        let entries = |dir: &Path, names: &[&'static str]| {
            let mut found = Vec::new();
            for &name in names {
                if let Some(entry) = probe_entry(&dir.join(name))? {
                    found.push((name, entry));
                }
            }
            Ok::<_, SetupError>(found)
        };
        Ok(Self {
            trees: entries(root, HOST_TREES)?,
            etc: entries(&root.join("etc"), HOST_ETC)?,
        })
    }
}

fn probe_entry(path: &Path) -> Result<Option<HostEntry>, SetupError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    if meta.file_type().is_symlink() {
        let dest = std::fs::read_link(path)
            .map_err(|_| step(format!("reading link {}", path.display()))(Errno::EIO))?;
        return Ok(Some(HostEntry::Link(dest)));
    }
    Ok(Some(if meta.is_dir() {
        HostEntry::Dir
    } else {
        HostEntry::File
    }))
}

/// Where the new root comes from.
#[derive(Debug, Clone)]
pub enum Root {
    /// A tmpfs with the host's shared paths (always read-only in the end).
    Host(HostFacts),
    /// The overlay of the sandbox's upper layer on its image.
    Image { readonly: bool },
}

/// The parts of a spawn the root's layout depends on.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub hostname: &'a str,
    pub network: Option<&'a ValidNet>,
    pub root: Root,
    /// The sandbox has a size-limited filesystem, whose `tmp/` becomes /tmp.
    pub disk_tmp: bool,
    pub ids: IdMap,
}

/// A descriptor [`apply`] holds for the plan: the plan names it, [`Held`] owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldDir {
    /// The sandbox's work directory, reopened in this mount namespace.
    Work,
    /// `tmp/` of the sandbox's size-limited filesystem.
    DiskTmp,
}

/// One step of building the root. Targets are the sandbox's paths; `source`s are the host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    /// Make every mount of the namespace private: nothing we mount propagates to the host.
    MakePrivate,
    Tmpfs {
        target: String,
        options: &'static str,
        flags: MsFlags,
    },
    /// The image overlay (from [`Held`]'s layers) as the new root.
    ImageRoot,
    /// Create a directory (an existing one is fine).
    Mkdir {
        path: String,
        mode: u32,
    },
    /// Make `path` a real directory, replacing a link or file an image put there (in the upper
    /// layer; the image is not touched): a mount must never follow a link.
    ReplaceWithDir {
        path: String,
    },
    /// Create an empty file (a bind target).
    Touch {
        path: String,
    },
    Symlink {
        path: String,
        dest: PathBuf,
    },
    /// Bind a host path recursively, every mount of it read-only, nosuid, nodev.
    BindReadonly {
        source: String,
        target: String,
    },
    /// Bind a held directory, nosuid and nodev.
    BindHeld {
        dir: HeldDir,
        target: String,
    },
    /// Bind one host device node, nosuid and noexec.
    BindDevice {
        source: String,
        target: String,
    },
    /// A fresh instance of a kernel filesystem: proc, devpts, mqueue.
    KernelFs {
        fstype: &'static str,
        target: String,
        options: Option<&'static str>,
        flags: MsFlags,
    },
    /// Create or truncate a file with this content.
    WriteFile {
        path: String,
        content: String,
    },
    /// Replace a file with a new one of this content, never writing through a link an image
    /// holds (left alone when it is a directory).
    ReplaceFile {
        path: String,
        content: String,
    },
    /// pivot_root into the new root and detach the old one.
    PivotRoot,
    /// Hide a file behind /dev/null, if it exists.
    MaskFile {
        target: String,
    },
    /// Hide a directory behind an empty read-only tmpfs, if it exists.
    MaskDir {
        target: String,
    },
    /// Bind a path on itself read-only, if it exists.
    ReadonlyIfPresent {
        target: String,
    },
    /// Make the root mount read-only (not recursively: /tmp, /work, /run stay writable).
    RootReadonly,
}

const TMPFS_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// The plan of a sandbox's root: pure, in the order [`apply`] runs it.
pub fn plan(spec: &Spec<'_>) -> Vec<MountOp> {
    use MountOp::*;
    let p = |s: &str| s.to_owned();
    let mut ops = vec![MakePrivate];
    let image = matches!(spec.root, Root::Image { .. });
    let host = spec.hostname;
    let etc_files = [
        ("hostname", format!("{host}\n")),
        ("hosts", crate::net::etc::hosts(host, spec.network)),
        ("resolv.conf", crate::net::etc::resolv_conf(spec.network)),
    ];
    match &spec.root {
        Root::Host(facts) => {
            ops.push(Tmpfs {
                target: p("/"),
                options: "mode=0755,size=16m,nr_inodes=4096",
                flags: TMPFS_FLAGS,
            });
            for (name, entry) in &facts.trees {
                share_host_path(&mut ops, &format!("/{name}"), entry);
            }
            ops.push(Mkdir {
                path: p("/etc"),
                mode: 0o755,
            });
            for (name, entry) in &facts.etc {
                share_host_path(&mut ops, &format!("/etc/{name}"), entry);
            }
            ops.push(WriteFile {
                path: p("/etc/passwd"),
                content: p("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
            });
            ops.push(WriteFile {
                path: p("/etc/group"),
                content: p("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"),
            });
            for (name, content) in etc_files {
                ops.push(WriteFile {
                    path: format!("/etc/{name}"),
                    content,
                });
            }
        }
        Root::Image { .. } => {
            ops.push(ImageRoot);
            for dir in ["etc", "work", "tmp", "run", "dev", "proc"] {
                ops.push(ReplaceWithDir {
                    path: format!("/{dir}"),
                });
            }
            // The image keeps its own passwd and group.
            for (name, content) in etc_files {
                ops.push(ReplaceFile {
                    path: format!("/etc/{name}"),
                    content,
                });
            }
        }
    }
    // /work: the sandbox's own directory, by descriptor (see `Held::open`).
    ops.push(Mkdir {
        path: p("/work"),
        mode: 0o755,
    });
    ops.push(BindHeld {
        dir: HeldDir::Work,
        target: p("/work"),
    });
    // /tmp: on the sandbox's size-limited filesystem when it has one, else a tmpfs.
    ops.push(Mkdir {
        path: p("/tmp"),
        mode: 0o755,
    });
    ops.push(if spec.disk_tmp {
        BindHeld {
            dir: HeldDir::DiskTmp,
            target: p("/tmp"),
        }
    } else {
        Tmpfs {
            target: p("/tmp"),
            options: "mode=1777,size=512m,nr_inodes=65536",
            flags: TMPFS_FLAGS,
        }
    });
    let mut scratch = vec![("/run", "mode=0755,size=16m,nr_inodes=4096")];
    // The host root has no /root of its own; an image keeps its own.
    if !image {
        scratch.push(("/root", "mode=0700,size=64m,nr_inodes=16384"));
    }
    for (dir, options) in scratch {
        ops.push(Mkdir {
            path: p(dir),
            mode: 0o755,
        });
        ops.push(Tmpfs {
            target: p(dir),
            options,
            flags: TMPFS_FLAGS,
        });
    }
    plan_dev(&mut ops, spec.ids);
    ops.push(Mkdir {
        path: p("/proc"),
        mode: 0o555,
    });
    ops.push(KernelFs {
        fstype: "proc",
        target: p("/proc"),
        options: None,
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    });
    ops.push(PivotRoot);
    for file in PROC_MASKED_FILES {
        ops.push(MaskFile {
            target: format!("/proc/{file}"),
        });
    }
    for dir in PROC_MASKED_DIRS {
        ops.push(MaskDir {
            target: format!("/proc/{dir}"),
        });
    }
    for path in PROC_READONLY {
        ops.push(ReadonlyIfPresent {
            target: format!("/proc/{path}"),
        });
    }
    // The host root (and so /etc) is read-only; an image root only when the spec says so.
    if matches!(spec.root, Root::Host(_) | Root::Image { readonly: true }) {
        ops.push(RootReadonly);
    }
    ops
}

/// Reproduce a host path in the new root: a link stays a link, a directory or file is bound
/// read-only.
fn share_host_path(ops: &mut Vec<MountOp>, path: &str, entry: &HostEntry) {
    let path = path.to_owned();
    match entry {
        HostEntry::Link(dest) => ops.push(MountOp::Symlink {
            path,
            dest: dest.clone(),
        }),
        HostEntry::Dir | HostEntry::File => {
            ops.push(if *entry == HostEntry::Dir {
                MountOp::Mkdir {
                    path: path.clone(),
                    mode: 0o755,
                }
            } else {
                MountOp::Touch { path: path.clone() }
            });
            ops.push(MountOp::BindReadonly {
                source: path.clone(),
                target: path,
            });
        }
    }
}

fn plan_dev(ops: &mut Vec<MountOp>, ids: IdMap) {
    use MountOp::*;
    ops.push(Mkdir {
        path: "/dev".into(),
        mode: 0o755,
    });
    ops.push(Tmpfs {
        target: "/dev".into(),
        options: "mode=0755,size=64k,nr_inodes=64",
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    });
    for node in DEV_NODES {
        let path = format!("/dev/{node}");
        ops.push(Touch { path: path.clone() });
        ops.push(BindDevice {
            source: path.clone(),
            target: path,
        });
    }
    ops.push(Mkdir {
        path: "/dev/pts".into(),
        mode: 0o755,
    });
    // gid 5 (tty) exists only when the sandbox has a full id range.
    let options = match ids {
        IdMap::Range { .. } => "newinstance,ptmxmode=0666,mode=0620,gid=5",
        IdMap::Single { .. } => "newinstance,ptmxmode=0666,mode=0620",
    };
    ops.push(KernelFs {
        fstype: "devpts",
        target: "/dev/pts".into(),
        options: Some(options),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    });
    ops.push(Symlink {
        path: "/dev/ptmx".into(),
        dest: "pts/ptmx".into(),
    });
    ops.push(Mkdir {
        path: "/dev/shm".into(),
        mode: 0o1777,
    });
    ops.push(Tmpfs {
        target: "/dev/shm".into(),
        options: "mode=1777,size=64m",
        flags: TMPFS_FLAGS,
    });
    ops.push(Mkdir {
        path: "/dev/mqueue".into(),
        mode: 0o1777,
    });
    ops.push(KernelFs {
        fstype: "mqueue",
        target: "/dev/mqueue".into(),
        options: None,
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    });
    for (link, dest) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(Symlink {
            path: format!("/dev/{link}"),
            dest: dest.into(),
        });
    }
}

/// One operation as a line of text: what the golden tests compare.
impl std::fmt::Display for MountOp {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountOp::MakePrivate => write!(out, "make-private /"),
            MountOp::Tmpfs {
                target,
                options,
                flags,
            } => write!(out, "tmpfs {target} {options} {}", flag_names(*flags)),
            MountOp::ImageRoot => write!(out, "image-root /"),
            MountOp::Mkdir { path, mode } => write!(out, "mkdir {path} {mode:04o}"),
            MountOp::ReplaceWithDir { path } => write!(out, "replace-with-dir {path}"),
            MountOp::Touch { path } => write!(out, "touch {path}"),
            MountOp::Symlink { path, dest } => {
                write!(out, "symlink {path} -> {}", dest.display())
            }
            MountOp::BindReadonly { source, target } => {
                write!(out, "bind-ro {target} <- host {source}")
            }
            MountOp::BindHeld { dir, target } => write!(out, "bind {target} <- held {dir:?}"),
            MountOp::BindDevice { source, target } => {
                write!(out, "bind-device {target} <- host {source}")
            }
            MountOp::KernelFs {
                fstype,
                target,
                options,
                flags,
            } => match options {
                Some(options) => write!(out, "{fstype} {target} {options} {}", flag_names(*flags)),
                None => write!(out, "{fstype} {target} {}", flag_names(*flags)),
            },
            MountOp::WriteFile { path, content } => {
                write!(out, "write {path} {content:?}")
            }
            MountOp::ReplaceFile { path, content } => {
                write!(out, "replace-file {path} {content:?}")
            }
            MountOp::PivotRoot => write!(out, "pivot-root"),
            MountOp::MaskFile { target } => write!(out, "mask-file {target}"),
            MountOp::MaskDir { target } => write!(out, "mask-dir {target}"),
            MountOp::ReadonlyIfPresent { target } => write!(out, "readonly {target}"),
            MountOp::RootReadonly => write!(out, "remount-ro /"),
        }
    }
}

fn flag_names(flags: MsFlags) -> String {
    [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_NOSUID, "nosuid"),
        (MsFlags::MS_NODEV, "nodev"),
        (MsFlags::MS_NOEXEC, "noexec"),
    ]
    .iter()
    .filter(|(flag, _)| flags.contains(*flag))
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join(",")
}

/// The descriptors a plan refers to, opened before anything hides the host's paths.
pub struct Held {
    /// The work directory, reopened in this mount namespace (a bind source must be a mount of
    /// this namespace).
    work: OwnedFd,
    /// `private/work-overlay`, the work directory of the overlay that mounts `work` as `/work`
    /// (absent in a sandbox prepared before it existed: then `/work` is a plain bind).
    work_overlay: Option<OwnedFd>,
    disk_tmp: Option<OwnedFd>,
    image: Option<ImageLayers>,
}

impl Held {
    /// Open what the plan binds: the work directory again by path, checked to be the very inode
    /// the helper created (a swapped path component fails the check instead of exposing another
    /// directory); with `disk_tmp`, the size-limited filesystem's `tmp/`; the image's layers.
    pub fn open(
        work: &OwnedFd,
        work_path: &Path,
        disk_tmp: bool,
        image: Option<ImageLower>,
    ) -> Result<Self, SetupError> {
        let reopened = open_path(work_path, "opening the work directory")?;
        let (a, b) = (
            fstat(work.as_raw_fd()).map_err(step("checking the work directory"))?,
            fstat(reopened.as_raw_fd()).map_err(step("checking the work directory"))?,
        );
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return Err(step("checking the work directory")(Errno::EXDEV));
        }
        // private/ holds the overlay's upper layer and, with a disk limit, /tmp.
        let private = work_path.parent().unwrap_or(work_path);
        let image = image
            .map(|lower| open_image_layers(private, lower))
            .transpose()?;
        let disk_tmp = disk_tmp
            .then(|| open_path(&private.join(TMP_DIR), "opening the sandbox's /tmp"))
            .transpose()?;
        let work_overlay = match open_path(&private.join(WORK_OVERLAY_DIR), "") {
            Ok(fd) => Some(fd),
            Err(SetupError {
                source: Errno::ENOENT,
                ..
            }) => None,
            Err(e) => return Err(step("opening the work directory's overlay")(e.source)),
        };
        Ok(Self {
            work: reopened,
            work_overlay,
            disk_tmp,
            image,
        })
    }

    fn dir(&self, dir: HeldDir) -> Result<&OwnedFd, SetupError> {
        match dir {
            HeldDir::Work => Ok(&self.work),
            HeldDir::DiskTmp => self
                .disk_tmp
                .as_ref()
                .ok_or_else(|| step("opening the sandbox's /tmp")(Errno::EBADF)),
        }
    }
}

/// Build the root of `spawn` and pivot into it: open what it needs, plan, apply.
pub fn build(
    spawn: &ValidSpawn,
    work: &OwnedFd,
    work_path: &Path,
    ids: IdMap,
    image: Option<ImageLower>,
) -> Result<(), SetupError> {
    // The sandbox's files (its `/etc`, mount points) get the sandbox's modes, not the helper's.
    crate::sys::set_umask(crate::sys::SANDBOX_UMASK);
    let root = match (&image, &spawn.rootfs) {
        (None, _) => Root::Host(HostFacts::probe()?),
        (Some(_), Rootfs::Image { readonly, .. }) => Root::Image {
            readonly: *readonly,
        },
        (Some(_), Rootfs::Host) => Root::Image { readonly: true },
    };
    let held = Held::open(work, work_path, spawn.limits.disk_bytes.is_some(), image)?;
    let spec = Spec {
        hostname: &spawn.hostname,
        network: spawn.network.as_ref(),
        root,
        disk_tmp: spawn.limits.disk_bytes.is_some(),
        ids,
    };
    apply(&plan(&spec), &held)
}

/// Run a plan, in order. The only function of the helper that mounts a sandbox's root.
pub fn apply(ops: &[MountOp], held: &Held) -> Result<(), SetupError> {
    let mut pivoted = false;
    // A sandbox path: under the new root until the pivot, itself after.
    let at = |path: &str, pivoted: bool| match (pivoted, path) {
        (true, _) => path.to_owned(),
        (false, "/") => NEW_ROOT.to_owned(),
        (false, _) => format!("{NEW_ROOT}{path}"),
    };
    for op in ops {
        match op {
            MountOp::MakePrivate => mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(step("making / private"))?,
            MountOp::Tmpfs {
                target,
                options,
                flags,
            } => mount_tmpfs(&at(target, pivoted), options, *flags)?,
            MountOp::ImageRoot => {
                let layers = held
                    .image
                    .as_ref()
                    .ok_or_else(|| step("opening the image")(Errno::EBADF))?;
                mount_image_root(layers, &at("/", pivoted))?;
            }
            MountOp::Mkdir { path, mode } => mkdir(&at(path, pivoted), *mode)?,
            MountOp::ReplaceWithDir { path } => replace_with_dir(&at(path, pivoted), path)?,
            MountOp::Touch { path } => touch(&at(path, pivoted))?,
            MountOp::Symlink { path, dest } => symlink(dest, at(path, pivoted))
                .map_err(|_| step(format!("linking {path}"))(Errno::EIO))?,
            MountOp::BindReadonly { source, target } => {
                bind_readonly(source, &at(target, pivoted))?
            }
            MountOp::BindHeld {
                dir: HeldDir::Work,
                target,
            } => match &held.work_overlay {
                Some(overlay) => mount_work(&held.work, overlay, &at(target, pivoted), target)?,
                None => bind_fd(&held.work, &at(target, pivoted), target)?,
            },
            MountOp::BindHeld { dir, target } => {
                bind_fd(held.dir(*dir)?, &at(target, pivoted), target)?
            }
            MountOp::BindDevice { source, target } => {
                let resolved = at(target, pivoted);
                mount(
                    Some(source.as_str()),
                    resolved.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(step(format!("binding {source}")))?;
                sys::mount_setattr(
                    &cpath(&resolved),
                    false,
                    MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                )
                .map_err(step(format!("securing {target}")))?;
            }
            MountOp::KernelFs {
                fstype,
                target,
                options,
                flags,
            } => mount(
                Some(*fstype),
                at(target, pivoted).as_str(),
                Some(*fstype),
                *flags,
                *options,
            )
            .map_err(step(format!("mounting {target}")))?,
            MountOp::WriteFile { path, content } => write_file(&at(path, pivoted), content)?,
            MountOp::ReplaceFile { path, content } => {
                replace_file(&at(path, pivoted), path, content)?
            }
            MountOp::PivotRoot => {
                pivot_into(NEW_ROOT)?;
                pivoted = true;
            }
            MountOp::MaskFile { target } => {
                let resolved = at(target, pivoted);
                if Path::new(&resolved).exists() {
                    mount(
                        Some("/dev/null"),
                        resolved.as_str(),
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(step(format!("masking {target}")))?;
                }
            }
            MountOp::MaskDir { target } => {
                let resolved = at(target, pivoted);
                if Path::new(&resolved).is_dir() {
                    mount_tmpfs(
                        &resolved,
                        "size=0,mode=0555",
                        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    )?;
                }
            }
            MountOp::ReadonlyIfPresent { target } => {
                let resolved = at(target, pivoted);
                if Path::new(&resolved).exists() {
                    bind_readonly(&resolved, &resolved)?;
                }
            }
            MountOp::RootReadonly => {
                sys::mount_setattr(&cpath(&at("/", pivoted)), false, MOUNT_ATTR_RDONLY)
                    .map_err(step("making / read-only"))?
            }
        }
    }
    Ok(())
}

/// mount(2), the one way [`apply`] and [`mount_image_root`] mount (the helper's clippy.toml
/// refuses `nix::mount::mount` elsewhere, so every other mount of the helper declares itself).
#[allow(
    clippy::disallowed_methods,
    reason = "this module is where a sandbox's root is mounted"
)]
fn mount<P1, P2, P3, P4>(
    source: Option<&P1>,
    target: &P2,
    fstype: Option<&P3>,
    flags: MsFlags,
    data: Option<&P4>,
) -> nix::Result<()>
where
    P1: ?Sized + NixPath,
    P2: ?Sized + NixPath,
    P3: ?Sized + NixPath,
    P4: ?Sized + NixPath,
{
    nix::mount::mount(source, target, fstype, flags, data)
}

fn cpath(p: &str) -> CString {
    CString::new(p).unwrap_or_default()
}

fn mount_tmpfs(target: &str, options: &str, flags: MsFlags) -> Result<(), SetupError> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options))
        .map_err(step(format!("mounting tmpfs on {target}")))
}

fn mkdir(path: &str, mode: u32) -> Result<(), SetupError> {
    match nix::unistd::mkdir(path, nix::sys::stat::Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(step(format!("creating {path}"))(e)),
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn touch(path: &str) -> Result<(), SetupError> {
    std::fs::File::create(path)
        .map(drop)
        .map_err(|e| step(format!("creating {path}"))(io_errno(&e)))
}

fn write_file(path: &str, content: &str) -> Result<(), SetupError> {
    std::fs::write(path, content).map_err(|e| step(format!("writing {path}"))(io_errno(&e)))
}

/// Bind `source` on `target` (recursively) and make every mount of it read-only, nosuid, nodev.
fn bind_readonly(source: &str, target: &str) -> Result<(), SetupError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step(format!("binding {source}")))?;
    sys::mount_setattr(
        &cpath(target),
        true,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
    )
    .map_err(step(format!("making {target} read-only")))
}

/// Open a directory by path as an `O_PATH` descriptor, refusing a symlink as its last component.
fn open_path(path: &Path, what: &'static str) -> Result<OwnedFd, SetupError> {
    crate::sys::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(step(what))
}

/// Bind the directory `fd` refers to on `target`, nosuid and nodev.
fn bind_fd(fd: &OwnedFd, target: &str, name: &str) -> Result<(), SetupError> {
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(step(format!("binding {name}")))?;
    sys::mount_setattr(&cpath(target), false, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        .map_err(step(format!("securing {name}")))
}

/// Mount the work directory at `target` (an empty directory of the new root) as an overlay: the
/// work directory is its upper layer, `target` itself its (empty) lower one, so everything the
/// sandbox writes lands in the work directory as plain files, exactly as with a bind. Unlike a
/// bind, whose mount root is the work directory's path within the host's filesystem (and shows in
/// the sandbox's mount table as the state directory's path), an overlay's root is its own, and
/// its layers are named by descriptor: the sandbox's mount table shows no host path.
fn mount_work(
    work: &OwnedFd,
    overlay: &OwnedFd,
    target: &str,
    name: &str,
) -> Result<(), SetupError> {
    let lower = open_path(Path::new(target), "opening the mount point of /work")?;
    let options = format!(
        "lowerdir=/proc/self/fd/{},upperdir=/proc/self/fd/{},workdir=/proc/self/fd/{},userxattr",
        lower.as_raw_fd(),
        work.as_raw_fd(),
        overlay.as_raw_fd()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(step(format!("mounting {name}")))
}

/// The layers of a sandbox's image root filesystem, held by descriptors.
pub struct ImageLayers {
    lower: ImageLower,
    /// For [`ImageLower::Path`]: the lower directory opened `O_PATH`.
    lower_dir: Option<OwnedFd>,
    upper: OwnedFd,
    work: OwnedFd,
}

/// Open the layers of a sandbox's image root: `private` is the sandbox's `private/` directory
/// (its `upper/` and `overlay-work/`), `lower` the image as [`crate::image`] prepared it.
pub fn open_image_layers(private: &Path, lower: ImageLower) -> Result<ImageLayers, SetupError> {
    let lower_dir = match &lower {
        ImageLower::Path(p) => Some(open_path(p, "opening the image")?),
        ImageLower::Idmapped(_) => None,
    };
    Ok(ImageLayers {
        lower,
        lower_dir,
        upper: open_path(&private.join(UPPER_DIR), "opening the upper layer")?,
        work: open_path(
            &private.join(OVERLAY_WORK_DIR),
            "opening the overlay's work directory",
        )?,
    })
}

/// Mount the sandbox's root as it looks inside: an overlay of its upper layer on the image, at
/// `target` (an existing directory). Runs in a mount namespace of the caller's (init's, or a
/// forked worker's); for an idmapped lower the detached mount is attached at `target` first and
/// the overlay stacked on it. The overlay keeps its metadata in `user.` xattrs (`userxattr`), as
/// every mount of the same upper layer must.
pub fn mount_image_root(layers: &ImageLayers, target: &str) -> Result<(), SetupError> {
    let lowerdir = match (&layers.lower, &layers.lower_dir) {
        (ImageLower::Idmapped(tree), _) => {
            sys::attach_mount(tree.as_fd(), &cpath(target)).map_err(step("attaching the image"))?;
            target.to_owned()
        }
        (ImageLower::Path(_), Some(dir)) => format!("/proc/self/fd/{}", dir.as_raw_fd()),
        (ImageLower::Path(_), None) => return Err(step("opening the image")(Errno::EBADF)),
    };
    let options = format!(
        "lowerdir={lowerdir},upperdir=/proc/self/fd/{},workdir=/proc/self/fd/{},userxattr",
        layers.upper.as_raw_fd(),
        layers.work.as_raw_fd()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(step("mounting the overlay"))
}

/// [`MountOp::ReplaceWithDir`] at `path` (`name` is the sandbox's path, for messages).
fn replace_with_dir(path: &str, name: &str) -> Result<(), SetupError> {
    match nix::sys::stat::lstat(path) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => return Ok(()),
        Ok(_) => nix::unistd::unlink(path).map_err(step(format!("replacing {name}")))?,
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(step(format!("checking {name}"))(e)),
    }
    mkdir(path, 0o755)
}

/// [`MountOp::ReplaceFile`] at `path` (`name` is the sandbox's path, for messages).
fn replace_file(path: &str, name: &str, content: &str) -> Result<(), SetupError> {
    match nix::unistd::unlink(path) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(Errno::EISDIR) => return Ok(()),
        Err(e) => return Err(step(format!("replacing {name}"))(e)),
    }
    let fd = crate::sys::open(
        path,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .map_err(step(format!("writing {name}")))?;
    std::fs::File::from(fd)
        .write_all(content.as_bytes())
        .map_err(|e| step(format!("writing {name}"))(io_errno(&e)))
}

/// pivot_root(".", ".") then detach the old root, as runc does: no directory for the old root is
/// needed and nothing of it stays reachable.
fn pivot_into(new_root: &str) -> Result<(), SetupError> {
    nix::unistd::chdir(new_root).map_err(step("entering the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: IdMap = IdMap::Range {
        slot: 1,
        base: 100_000,
        size: 65_536,
    };
    const SINGLE: IdMap = IdMap::Single {
        uid: 1000,
        gid: 1000,
    };

    /// The host-mode /etc files that describe a sandbox named "box" without a network.
    const HOST_ETC_FILES: &str = r##"write /etc/passwd "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
write /etc/group "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"
write /etc/hostname "box\n"
write /etc/hosts "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tbox\n"
write /etc/resolv.conf "# sandboxd: this sandbox has no network (mode \"none\"), so no name servers\n"
"##;

    const IMAGE_HEAD: &str = r##"make-private /
image-root /
replace-with-dir /etc
replace-with-dir /work
replace-with-dir /tmp
replace-with-dir /run
replace-with-dir /dev
replace-with-dir /proc
replace-file /etc/hostname "box\n"
replace-file /etc/hosts "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tbox\n"
replace-file /etc/resolv.conf "# sandboxd: this sandbox has no network (mode \"none\"), so no name servers\n"
mkdir /work 0755
bind /work <- held Work
"##;

    const DEV_NODES_TEXT: &str = "mkdir /dev 0755
tmpfs /dev mode=0755,size=64k,nr_inodes=64 nosuid,noexec
touch /dev/null
bind-device /dev/null <- host /dev/null
touch /dev/zero
bind-device /dev/zero <- host /dev/zero
touch /dev/full
bind-device /dev/full <- host /dev/full
touch /dev/random
bind-device /dev/random <- host /dev/random
touch /dev/urandom
bind-device /dev/urandom <- host /dev/urandom
touch /dev/tty
bind-device /dev/tty <- host /dev/tty
mkdir /dev/pts 0755
";

    /// From /dev/pts's mount (not included) to the last mask of /proc.
    const DEV_REST_AND_PROC: &str = "symlink /dev/ptmx -> pts/ptmx
mkdir /dev/shm 1777
tmpfs /dev/shm mode=1777,size=64m nosuid,nodev
mkdir /dev/mqueue 1777
mqueue /dev/mqueue nosuid,nodev,noexec
symlink /dev/fd -> /proc/self/fd
symlink /dev/stdin -> /proc/self/fd/0
symlink /dev/stdout -> /proc/self/fd/1
symlink /dev/stderr -> /proc/self/fd/2
mkdir /proc 0555
proc /proc nosuid,nodev,noexec
pivot-root
mask-file /proc/kcore
mask-file /proc/keys
mask-file /proc/timer_list
mask-file /proc/sched_debug
mask-file /proc/latency_stats
mask-file /proc/timer_stats
mask-file /proc/cmdline
mask-file /proc/kallsyms
mask-file /proc/modules
mask-file /proc/config.gz
mask-file /proc/kmsg
mask-file /proc/iomem
mask-file /proc/ioports
mask-file /proc/vmallocinfo
mask-file /proc/slabinfo
mask-file /proc/kpagecount
mask-file /proc/kpageflags
mask-file /proc/kpagecgroup
mask-file /proc/buddyinfo
mask-file /proc/pagetypeinfo
mask-file /proc/zoneinfo
mask-file /proc/partitions
mask-file /proc/diskstats
mask-file /proc/swaps
mask-file /proc/devices
mask-file /proc/interrupts
mask-file /proc/softirqs
mask-file /proc/locks
mask-file /proc/mtrr
mask-file /proc/dma
mask-dir /proc/acpi
mask-dir /proc/scsi
mask-dir /proc/asound
readonly /proc/sys
readonly /proc/sysrq-trigger
readonly /proc/irq
readonly /proc/bus
readonly /proc/fs
";

    const PTS_RANGE: &str =
        "devpts /dev/pts newinstance,ptmxmode=0666,mode=0620,gid=5 nosuid,noexec\n";
    const PTS_SINGLE: &str = "devpts /dev/pts newinstance,ptmxmode=0666,mode=0620 nosuid,noexec\n";

    fn spec(root: Root, disk_tmp: bool, ids: IdMap) -> Spec<'static> {
        Spec {
            hostname: "box",
            network: None,
            root,
            disk_tmp,
            ids,
        }
    }

    /// Compare the plan's text with `expected`, showing both in full on a difference.
    fn check(spec: &Spec<'_>, expected: &str) {
        let actual: String = plan(spec).iter().map(|op| format!("{op}\n")).collect();
        assert!(
            actual == expected,
            "plan differs\n--- actual\n{actual}--- expected\n{expected}"
        );
    }

    fn merged_usr() -> HostFacts {
        HostFacts {
            trees: vec![
                ("usr", HostEntry::Dir),
                ("bin", HostEntry::Link("usr/bin".into())),
                ("lib", HostEntry::Link("usr/lib".into())),
            ],
            etc: vec![
                ("ld.so.cache", HostEntry::File),
                ("ssl", HostEntry::Dir),
                (
                    "localtime",
                    HostEntry::Link("/usr/share/zoneinfo/UTC".into()),
                ),
            ],
        }
    }

    #[test]
    fn host_root_with_a_merged_usr() {
        let head = "make-private /
tmpfs / mode=0755,size=16m,nr_inodes=4096 nosuid,nodev
mkdir /usr 0755
bind-ro /usr <- host /usr
symlink /bin -> usr/bin
symlink /lib -> usr/lib
mkdir /etc 0755
touch /etc/ld.so.cache
bind-ro /etc/ld.so.cache <- host /etc/ld.so.cache
mkdir /etc/ssl 0755
bind-ro /etc/ssl <- host /etc/ssl
symlink /etc/localtime -> /usr/share/zoneinfo/UTC
";
        let scratch = "mkdir /work 0755
bind /work <- held Work
mkdir /tmp 0755
tmpfs /tmp mode=1777,size=512m,nr_inodes=65536 nosuid,nodev
mkdir /run 0755
tmpfs /run mode=0755,size=16m,nr_inodes=4096 nosuid,nodev
mkdir /root 0755
tmpfs /root mode=0700,size=64m,nr_inodes=16384 nosuid,nodev
";
        check(
            &spec(Root::Host(merged_usr()), false, RANGE),
            &format!(
                "{head}{HOST_ETC_FILES}{scratch}{DEV_NODES_TEXT}{PTS_RANGE}{DEV_REST_AND_PROC}remount-ro /\n"
            ),
        );
    }

    #[test]
    fn host_root_with_a_split_usr_and_a_disk_limit() {
        let facts = HostFacts {
            trees: vec![
                ("usr", HostEntry::Dir),
                ("bin", HostEntry::Dir),
                ("sbin", HostEntry::Dir),
                ("lib", HostEntry::Dir),
                ("lib64", HostEntry::Dir),
            ],
            etc: vec![],
        };
        let head = "make-private /
tmpfs / mode=0755,size=16m,nr_inodes=4096 nosuid,nodev
mkdir /usr 0755
bind-ro /usr <- host /usr
mkdir /bin 0755
bind-ro /bin <- host /bin
mkdir /sbin 0755
bind-ro /sbin <- host /sbin
mkdir /lib 0755
bind-ro /lib <- host /lib
mkdir /lib64 0755
bind-ro /lib64 <- host /lib64
mkdir /etc 0755
";
        // With a disk limit, /tmp is the limited filesystem's, not a tmpfs.
        let scratch = "mkdir /work 0755
bind /work <- held Work
mkdir /tmp 0755
bind /tmp <- held DiskTmp
mkdir /run 0755
tmpfs /run mode=0755,size=16m,nr_inodes=4096 nosuid,nodev
mkdir /root 0755
tmpfs /root mode=0700,size=64m,nr_inodes=16384 nosuid,nodev
";
        check(
            &spec(Root::Host(facts), true, SINGLE),
            &format!(
                "{head}{HOST_ETC_FILES}{scratch}{DEV_NODES_TEXT}{PTS_SINGLE}{DEV_REST_AND_PROC}remount-ro /\n"
            ),
        );
    }

    #[test]
    fn writable_image_root_keeps_its_own_root_home_and_stays_writable() {
        let scratch = "mkdir /tmp 0755
tmpfs /tmp mode=1777,size=512m,nr_inodes=65536 nosuid,nodev
mkdir /run 0755
tmpfs /run mode=0755,size=16m,nr_inodes=4096 nosuid,nodev
";
        check(
            &spec(Root::Image { readonly: false }, false, RANGE),
            &format!("{IMAGE_HEAD}{scratch}{DEV_NODES_TEXT}{PTS_RANGE}{DEV_REST_AND_PROC}"),
        );
    }

    #[test]
    fn readonly_image_root_with_a_disk_limit() {
        let scratch = "mkdir /tmp 0755
bind /tmp <- held DiskTmp
mkdir /run 0755
tmpfs /run mode=0755,size=16m,nr_inodes=4096 nosuid,nodev
";
        check(
            &spec(Root::Image { readonly: true }, true, SINGLE),
            &format!(
                "{IMAGE_HEAD}{scratch}{DEV_NODES_TEXT}{PTS_SINGLE}{DEV_REST_AND_PROC}remount-ro /\n"
            ),
        );
    }

    #[test]
    fn a_bridged_network_names_the_sandbox_on_its_address() {
        let net = crate::net::etc::sample_net();
        let spec = Spec {
            network: Some(&net),
            ..spec(Root::Image { readonly: true }, false, RANGE)
        };
        let hosts = plan(&spec)
            .into_iter()
            .find_map(|op| match op {
                MountOp::ReplaceFile { path, content } if path == "/etc/hosts" => Some(content),
                _ => None,
            })
            .expect("the plan writes /etc/hosts");
        assert!(hosts.contains("10.88.0.3\tbox\n") && hosts.contains("10.88.0.2\tdb\n"));
    }

    #[test]
    fn probe_reads_a_merged_usr_layout() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        std::fs::create_dir_all(r.join("etc/ssl")).unwrap();
        std::fs::write(r.join("etc/ld.so.cache"), b"").unwrap();
        symlink("/usr/share/zoneinfo/UTC", r.join("etc/localtime")).unwrap();
        // Never shared, whatever the host has.
        std::fs::write(r.join("etc/shadow"), b"root:x").unwrap();
        let facts = HostFacts::probe_at(r).unwrap();
        let mut expected = merged_usr();
        // Probing follows the order of HOST_ETC.
        expected
            .etc
            .sort_by_key(|(name, _)| HOST_ETC.iter().position(|n| n == name));
        assert_eq!(facts, expected);
    }

    #[test]
    fn probe_reads_a_split_usr_layout() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for dir in ["usr", "bin", "sbin", "lib", "lib64"] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        let facts = HostFacts::probe_at(r).unwrap();
        let names: Vec<_> = facts.trees.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["usr", "bin", "sbin", "lib", "lib64"]);
        assert!(facts.trees.iter().all(|(_, e)| *e == HostEntry::Dir));
        assert!(facts.etc.is_empty());
    }

    #[test]
    fn nothing_but_proc_masks_and_the_read_only_root_follows_the_pivot() {
        for root in [Root::Host(merged_usr()), Root::Image { readonly: true }] {
            let ops = plan(&spec(root, true, RANGE));
            let pivot = ops.iter().position(|op| *op == MountOp::PivotRoot);
            let after = &ops[pivot.expect("the plan pivots") + 1..];
            assert!(!after.is_empty());
            assert!(after.iter().all(|op| matches!(
                op,
                MountOp::MaskFile { .. }
                    | MountOp::MaskDir { .. }
                    | MountOp::ReadonlyIfPresent { .. }
                    | MountOp::RootReadonly
            )));
        }
    }
}
