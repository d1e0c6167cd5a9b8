//! The image the `sandboxd+image` peer runs `true` from: `/bin/true` and the libraries `ldd`
//! names, copied from the host into a root filesystem tarball and imported once per run.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use sandboxd_client::Client;

/// Name of the benchmark's image.
pub const IMAGE: &str = "sandboxd-bench-true";

/// Build the tarball in `dir` and import it (replacing an image of the same name).
pub async fn import(client: &Client, dir: &Path) -> anyhow::Result<()> {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/true", root.join("bin/true")).context("copying /bin/true")?;
    let ldd = Command::new("ldd")
        .arg("/bin/true")
        .output()
        .context("running ldd")?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let target = root.join(lib.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(lib, &target).with_context(|| format!("copying {lib}"))?;
    }
    let archive = dir.join("true.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .context("running tar")?;
    anyhow::ensure!(status.success(), "tar exited with {status}");
    let _ = client.delete_image(IMAGE).await;
    client
        .import_image(IMAGE, &archive)
        .await
        .context("importing the benchmark image")?;
    Ok(())
}
