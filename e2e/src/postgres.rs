//! PostgreSQL as a throwaway database server on the backend: a fresh cluster in a temporary
//! directory (outside the test directory, which only root may enter), run as the `postgres`
//! user, stopped with the topology and removed when the returned directory is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::addr;
use crate::topology::{DaemonId, Node, Topology};
use crate::wait::wait_until;

/// The newest PostgreSQL server's `bin` directory under `/usr/lib/postgresql`.
pub fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql): run scripts/setup.sh")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!("no PostgreSQL server under /usr/lib/postgresql: run scripts/setup.sh"),
    }
}

/// Starts a throwaway cluster on the backend at `addr::BACKEND:5432`, trusting the connector's
/// backend-side address (`addr::CONN_BACK`) and local connections, and waits until `psql`
/// from the connector's namespace gets an answer. Returns the server and its directory.
pub fn start(t: &Topology) -> Result<(DaemonId, tempfile::TempDir)> {
    let bin = bin_dir()?;
    let pg = tempfile::Builder::new()
        .prefix("ztna-e2e-pg-")
        .tempdir()
        .context("creating the PostgreSQL directory")?;
    let data = pg.path().join("data");
    std::fs::create_dir(&data).context("creating the data directory")?;
    let s = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 path");
    let (dir_s, data_s) = (s(pg.path())?, s(&data)?);
    t.host(10, ["chmod", "0755", &dir_s])?;
    t.run_ok(
        Node::Backend,
        10,
        ["chown", "-R", "postgres:postgres", &dir_s],
    )?;
    let as_pg = || -> Vec<String> {
        ["--reuid=postgres", "--regid=postgres", "--init-groups"]
            .map(str::to_owned)
            .to_vec()
    };
    let mut initdb = vec!["setpriv".to_owned()];
    initdb.extend(as_pg());
    initdb.extend([s(&bin.join("initdb"))?, "-D".into(), data_s.clone()]);
    initdb.extend(["-A", "trust", "-U", "postgres"].map(str::to_owned));
    t.run_ok(Node::Backend, 120, &initdb)?;
    std::fs::write(
        data.join("pg_hba.conf"),
        format!(
            "local all all trust\nhost all all {}/32 trust\n",
            addr::CONN_BACK
        ),
    )
    .context("writing pg_hba.conf")?;
    let mut args = as_pg();
    args.extend([s(&bin.join("postgres"))?, "-D".into(), data_s]);
    args.extend([
        "-c".into(),
        format!("listen_addresses={}", addr::BACKEND),
        "-c".into(),
        "port=5432".into(),
        "-c".into(),
        format!("unix_socket_directories={dir_s}"),
    ]);
    let server = t.spawn(Node::Backend, "postgres", "setpriv", args)?;
    let direct = format!(
        "host={} port=5432 user=postgres dbname=postgres connect_timeout=3",
        addr::BACKEND
    );
    wait_until(
        "PostgreSQL to answer from the connector namespace",
        Duration::from_secs(30),
        || {
            !t.is_running(server)
                || t.run(Node::Conn, 5, ["psql", "-X", &direct, "-tAc", "SELECT 1"])
                    .is_ok_and(|o| o.success())
        },
    )?;
    t.ensure_running(server)?;
    Ok((server, pg))
}
