//! The sandbox's root filesystem, built inside its own mount namespace: "host" mode (below) or
//! an image (an overlay of the sandbox's upper layer on the image: [`open_image_layers`] and
//! [`mount_image_root`], which a forked worker can call too to see a sandbox's root as it looks
//! inside).
//!
//! A tmpfs becomes the new root. It receives read-only binds of the host's /usr (and /bin, /sbin,
//! /lib* as links or binds, whatever the host has), an /etc of its own with a few host files that
//! programs need bound read-only (never shadow, ssh keys, sudoers...), a fresh /proc with the
//! dangerous files masked, a minimal /dev, tmpfs /tmp, /root and /run, and the sandbox's work
//! directory at /work. Then `pivot_root` and a lazy unmount of the old root leave nothing of the
//! host's mount table behind, and the root itself is made read-only.
//!
//! The tmpfs is mounted on the host's /tmp *inside the new mount namespace only*: the host's /tmp
//! is untouched, and the work directory is reached through an already-open descriptor, so hiding
//! the host's /tmp hides nothing we need.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::fstat;

use sandboxd_protocol::layout::{OVERLAY_WORK_DIR, TMP_DIR, UPPER_DIR};

use super::{step, ImageLower, SetupError};
use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::validate::{IdMap, Rootfs, ValidSpawn};

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

/// Files of /proc that reveal or change host state: hidden behind /dev/null.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "timer_stats",
];
/// Directories of /proc hidden behind an empty read-only tmpfs.
const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound"];
/// Parts of /proc kept but read-only.
const PROC_READONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];

const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

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

fn touch(path: &str) -> Result<(), SetupError> {
    std::fs::File::create(path).map(drop).map_err(|e| {
        step(format!("creating {path}"))(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    })
}

fn write_file(path: &str, content: &str) -> Result<(), SetupError> {
    std::fs::write(path, content).map_err(|e| {
        step(format!("writing {path}"))(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    })
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

/// Reproduce a host path in the new root: a link stays a link, a directory or file is bound
/// read-only, a missing path is skipped.
fn share_host_path(host: &str, target: &str) -> Result<(), SetupError> {
    let Ok(meta) = std::fs::symlink_metadata(host) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        let dest = std::fs::read_link(host)
            .map_err(|_| step(format!("reading link {host}"))(Errno::EIO))?;
        return symlink(dest, target).map_err(|_| step(format!("linking {target}"))(Errno::EIO));
    }
    if meta.is_dir() {
        mkdir(target, 0o755)?;
    } else {
        touch(target)?;
    }
    bind_readonly(host, target)
}

pub fn build(
    spawn: &ValidSpawn,
    work: &OwnedFd,
    work_path: &Path,
    ids: IdMap,
    image: Option<ImageLower>,
) -> Result<(), SetupError> {
    // The work directory, reopened before anything hides the host's paths (see below).
    let reopened = open_path(work_path, "opening the work directory")?;
    let (a, b) = (
        fstat(work.as_raw_fd()).map_err(step("checking the work directory"))?,
        fstat(reopened.as_raw_fd()).map_err(step("checking the work directory"))?,
    );
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
        return Err(step("checking the work directory")(Errno::EXDEV));
    }
    // private/ holds the overlay's upper layer and, with a disk limit, /tmp: opened now too.
    let private = work_path.parent().unwrap_or(work_path);
    let layers = image
        .map(|lower| open_image_layers(private, lower))
        .transpose()?;
    let disk_tmp = spawn
        .limits
        .disk_bytes
        .map(|_| open_path(&private.join(TMP_DIR), "opening the sandbox's /tmp"))
        .transpose()?;
    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making / private"))?;
    let new = |p: &str| format!("{NEW_ROOT}/{p}");

    match &layers {
        None => {
            mount_tmpfs(
                NEW_ROOT,
                "mode=0755,size=16m,nr_inodes=4096",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            )?;
            for tree in HOST_TREES {
                share_host_path(&format!("/{tree}"), &new(tree))?;
            }
            build_etc(spawn, &new("etc"))?;
        }
        Some(layers) => {
            mount_image_root(layers, NEW_ROOT)?;
            for dir in ["etc", "work", "tmp", "run", "dev", "proc"] {
                ensure_dir(NEW_ROOT, dir)?;
            }
            image_etc(spawn, &new("etc"))?;
        }
    }

    // /work: the sandbox's own directory. A bind source must be a mount of this namespace, so
    // the directory is opened again by path here and checked to be the very inode the helper
    // created (a swapped path component fails the check instead of exposing another directory).
    mkdir(&new("work"), 0o755)?;
    bind_fd(&reopened, &new("work"), "/work")?;
    // /tmp: on the sandbox's size-limited filesystem when it has one, else a tmpfs.
    mkdir(&new("tmp"), 0o755)?;
    match &disk_tmp {
        Some(tmp) => bind_fd(tmp, &new("tmp"), "/tmp")?,
        None => mount_tmpfs(
            &new("tmp"),
            "mode=1777,size=512m,nr_inodes=65536",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        )?,
    }
    let mut scratch = vec![("run", "mode=0755,size=16m,nr_inodes=4096")];
    // The host root has no /root of its own; an image keeps its own.
    if layers.is_none() {
        scratch.push(("root", "mode=0700,size=64m,nr_inodes=16384"));
    }
    for (dir, options) in scratch {
        mkdir(&new(dir), 0o755)?;
        mount_tmpfs(&new(dir), options, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    }
    build_dev(&new("dev"), ids)?;
    mkdir(&new("proc"), 0o555)?;
    mount(
        Some("proc"),
        new("proc").as_str(),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("mounting /proc"))?;

    pivot_into(NEW_ROOT)?;
    mask_proc()?;
    // The host root (and so /etc) is read-only; an image root only when the spec says so.
    // /tmp, /work, /run stay writable.
    let readonly = match &spawn.rootfs {
        Rootfs::Host => true,
        Rootfs::Image { readonly, .. } => *readonly,
    };
    if readonly {
        sys::mount_setattr(&cpath("/"), false, MOUNT_ATTR_RDONLY)
            .map_err(step("making / read-only"))?;
    }
    Ok(())
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

/// Make `root/name` a real directory: an image may have put a link or a file there, which a
/// mount must never follow (it is replaced in the upper layer, the image is not touched).
fn ensure_dir(root: &str, name: &str) -> Result<(), SetupError> {
    let path = format!("{root}/{name}");
    match nix::sys::stat::lstat(path.as_str()) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => return Ok(()),
        Ok(st)
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK
                || st.st_mode & libc::S_IFMT == libc::S_IFREG =>
        {
            nix::unistd::unlink(path.as_str()).map_err(step(format!("replacing /{name}")))?;
        }
        Ok(_) => {
            nix::unistd::unlink(path.as_str()).map_err(step(format!("replacing /{name}")))?;
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(step(format!("checking /{name}"))(e)),
    }
    mkdir(&path, 0o755)
}

/// The files of an image's /etc that describe this sandbox (the image keeps its own passwd and
/// group): written fresh in the upper layer, never through a link the image holds.
fn image_etc(spawn: &ValidSpawn, etc: &str) -> Result<(), SetupError> {
    let host = &spawn.hostname;
    let net = spawn.network.as_ref();
    for (name, content) in [
        ("hostname", format!("{host}\n")),
        ("hosts", crate::net::etc::hosts(host, net)),
        ("resolv.conf", crate::net::etc::resolv_conf(net)),
    ] {
        let path = format!("{etc}/{name}");
        match nix::unistd::unlink(path.as_str()) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) => continue,
            Err(e) => return Err(step(format!("replacing /etc/{name}"))(e)),
        }
        let fd = crate::sys::open(
            path.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .map_err(step(format!("writing /etc/{name}")))?;
        std::fs::File::from(fd)
            .write_all(content.as_bytes())
            .map_err(|e| {
                step(format!("writing /etc/{name}"))(Errno::from_raw(
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            })?;
    }
    Ok(())
}

fn build_etc(spawn: &ValidSpawn, etc: &str) -> Result<(), SetupError> {
    mkdir(etc, 0o755)?;
    for name in HOST_ETC {
        share_host_path(&format!("/etc/{name}"), &format!("{etc}/{name}"))?;
    }
    let host = &spawn.hostname;
    write_file(
        &format!("{etc}/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    write_file(
        &format!("{etc}/group"),
        "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    )?;
    write_file(&format!("{etc}/hostname"), &format!("{host}\n"))?;
    let net = spawn.network.as_ref();
    write_file(&format!("{etc}/hosts"), &crate::net::etc::hosts(host, net))?;
    write_file(
        &format!("{etc}/resolv.conf"),
        &crate::net::etc::resolv_conf(net),
    )?;
    Ok(())
}

fn build_dev(dev: &str, ids: IdMap) -> Result<(), SetupError> {
    mkdir(dev, 0o755)?;
    mount_tmpfs(
        dev,
        "mode=0755,size=64k,nr_inodes=64",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    for node in DEV_NODES {
        let target = format!("{dev}/{node}");
        touch(&target)?;
        mount(
            Some(format!("/dev/{node}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(format!("binding /dev/{node}")))?;
        sys::mount_setattr(
            &cpath(&target),
            false,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        )
        .map_err(step(format!("securing /dev/{node}")))?;
    }
    let pts = format!("{dev}/pts");
    mkdir(&pts, 0o755)?;
    // gid 5 (tty) exists only when the sandbox has a full id range.
    let pts_options = match ids {
        IdMap::Range { .. } => "newinstance,ptmxmode=0666,mode=0620,gid=5",
        IdMap::Single { .. } => "newinstance,ptmxmode=0666,mode=0620",
    };
    mount(
        Some("devpts"),
        pts.as_str(),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(pts_options),
    )
    .map_err(step("mounting /dev/pts"))?;
    symlink("pts/ptmx", format!("{dev}/ptmx"))
        .map_err(|_| step("linking /dev/ptmx")(Errno::EIO))?;
    let shm = format!("{dev}/shm");
    mkdir(&shm, 0o1777)?;
    mount_tmpfs(
        &shm,
        "mode=1777,size=64m",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let mqueue = format!("{dev}/mqueue");
    mkdir(&mqueue, 0o1777)?;
    mount(
        Some("mqueue"),
        mqueue.as_str(),
        Some("mqueue"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("mounting /dev/mqueue"))?;
    for (link, dest) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(dest, format!("{dev}/{link}"))
            .map_err(|_| step(format!("linking /dev/{link}"))(Errno::EIO))?;
    }
    Ok(())
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

fn mask_proc() -> Result<(), SetupError> {
    for file in PROC_MASKED_FILES {
        let target = format!("/proc/{file}");
        if Path::new(&target).exists() {
            mount(
                Some("/dev/null"),
                target.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step(format!("masking {target}")))?;
        }
    }
    for dir in PROC_MASKED_DIRS {
        let target = format!("/proc/{dir}");
        if Path::new(&target).is_dir() {
            mount_tmpfs(
                &target,
                "size=0,mode=0555",
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            )?;
        }
    }
    for path in PROC_READONLY {
        let target = format!("/proc/{path}");
        if Path::new(&target).exists() {
            bind_readonly(&target, &target)?;
        }
    }
    Ok(())
}
