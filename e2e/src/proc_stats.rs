//! A process's resident memory and open file descriptors, read from `/proc` (for leak and
//! backpressure checks on the daemons).

use anyhow::{Context, Result};

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&text).with_context(|| format!("no VmRSS line in {path}"))
}

/// The number of entries of `/proc/<pid>/fd`.
pub fn fd_count(pid: u32) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    let dir = std::fs::read_dir(&path).with_context(|| format!("listing {path}"))?;
    Ok(dir.count())
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let s = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    5120 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(s), Some(5120));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).expect("rss") > 0);
        assert!(fd_count(pid).expect("fds") >= 3);
    }
}
