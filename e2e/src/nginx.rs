//! nginx as a throwaway HTTP server in a test namespace: a temporary config under the test's
//! directory, no system service, stopped with the topology; and the web roots it serves.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::topology::{DaemonId, Node, Topology};
use crate::wait::wait_until;

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

/// Starts nginx in `node`'s namespace listening on `listen` (`IP:PORT`) and serving `root`;
/// waits until it answers from the connector's namespace.
pub fn start(t: &Topology, node: Node, listen: &str, root: &Path) -> Result<DaemonId> {
    let dir = t
        .dir()
        .join(format!("nginx-{}", listen.replace([':', '.'], "-")));
    std::fs::create_dir_all(dir.join("tmp")).context("creating the nginx directory")?;
    let d = path(&dir)?;
    let conf = format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\n\
         pid {d}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  default_type application/octet-stream;\n\
           sendfile on;\n  keepalive_requests 100000;\n\
           client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
           fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
           scgi_temp_path {d}/tmp/scgi;\n\
           server {{\n    listen {listen} backlog=4096;\n    root {};\n  }}\n}}\n",
        path(root)?
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
    let id = t.spawn(
        node,
        "nginx",
        "nginx",
        ["-p", d, "-e", "stderr", "-c", path(&conf_path)?],
    )?;
    let url = format!("http://{listen}/");
    wait_until(
        "nginx to answer from the connector namespace",
        Duration::from_secs(10),
        || {
            !t.is_running(id)
                || t.run(
                    Node::Conn,
                    5,
                    ["curl", "-s", "-o", "/dev/null", "-m", "2", &url],
                )
                .is_ok_and(|o| o.success())
        },
    )?;
    t.ensure_running(id)?;
    t.step(&format!("nginx up on {listen}"));
    Ok(id)
}

/// Writes `bytes` random bytes to `p`.
pub fn random_file(p: &Path, bytes: u64) -> Result<()> {
    let mut src = File::open("/dev/urandom")
        .context("opening /dev/urandom")?
        .take(bytes);
    let mut dst = File::create(p).with_context(|| format!("creating {}", p.display()))?;
    let n =
        std::io::copy(&mut src, &mut dst).with_context(|| format!("filling {}", p.display()))?;
    ensure!(n == bytes, "wrote {n} of {bytes} bytes to {}", p.display());
    dst.flush()?;
    Ok(())
}

/// The sha256 of a file, by `sha256sum`.
pub fn sha256(t: &Topology, p: &Path) -> Result<String> {
    let out = t.host(120, ["sha256sum", path(p)?])?;
    ensure!(out.success(), "{out}");
    out.stdout
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

/// A web root with `index.html` (returned, with its body) and, when `big` is set, `big.bin` of
/// that many bytes.
pub fn web_root(t: &Topology, big: Option<u64>) -> Result<(PathBuf, String)> {
    let root = t.dir().join("www");
    std::fs::create_dir_all(&root).context("creating the web root")?;
    let body = format!("ztna web {}\n", crate::random_hex(16)?);
    std::fs::write(root.join("index.html"), &body).context("writing index.html")?;
    if let Some(n) = big {
        random_file(&root.join("big.bin"), n)?;
    }
    Ok((root, body))
}
