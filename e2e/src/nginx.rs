//! nginx as a throwaway HTTP server in a test namespace: a temporary config under the test's
//! directory, no system service, stopped with the topology.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

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
