//! Reload triggers for files a daemon reads while it runs (the relay's policy, deny lists,
//! CRLs): SIGHUP, and a cheap poll of each file's metadata.
//!
//! [`FileWatch`] is pure apart from `stat`: it remembers each file's (modification time, size,
//! inode) and says when one differs. [`Reloader`] waits for SIGHUP or a change seen by a poll.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What identifies one version of a file for [`FileWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Remembers the version of each watched file. Editors that replace a file (new inode), append
/// to it (size) or rewrite it in place (modification time) are all seen; so are a file that
/// disappears and one that appears.
#[derive(Debug, Default)]
pub struct FileWatch {
    files: Vec<(PathBuf, Option<Stamp>)>,
}

impl FileWatch {
    /// Watches `paths`, taking their current versions as seen.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let mut w = Self::default();
        w.set_paths(paths);
        w
    }

    /// Replaces the watched paths (after a reload named other files), taking their current
    /// versions as seen.
    pub fn set_paths(&mut self, paths: Vec<PathBuf>) {
        self.files = paths
            .into_iter()
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect();
    }

    /// Whether any file changed since the last call (or since it was watched); remembers the
    /// new versions.
    pub fn changed(&mut self) -> bool {
        let mut any = false;
        for (path, seen) in &mut self.files {
            let now = stamp(path);
            if now != *seen {
                *seen = now;
                any = true;
            }
        }
        any
    }

    /// The watched paths.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
    }
}

/// How long a changed file must stay unchanged before a poll reloads it.
pub const SETTLE: Duration = Duration::from_millis(250);
/// How many times [`SETTLE`] is waited for at most, for a file that keeps changing.
pub const SETTLE_ROUNDS: u32 = 20;

/// Why a reload is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A watched file changed.
    FileChanged,
}

/// Waits for the next reload trigger: SIGHUP, or (when `poll` is set) a change of a watched
/// file seen by a poll every `poll`.
pub struct Reloader {
    sighup: Option<tokio::signal::unix::Signal>,
    watch: FileWatch,
    poll: Option<tokio::time::Interval>,
}

impl Reloader {
    /// Installs the SIGHUP handler and watches `paths`. Must be called inside a tokio runtime.
    /// A failure to install the handler is logged; the poll still works.
    pub fn new(paths: Vec<PathBuf>, poll: Option<Duration>) -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let sighup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; reloads only on file changes");
                None
            }
        };
        let poll = poll.filter(|p| !p.is_zero()).map(|p| {
            let mut i = tokio::time::interval(p);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Self {
            sighup,
            watch: FileWatch::new(paths),
            poll,
        }
    }

    /// Watches other files from now on.
    pub fn set_paths(&mut self, paths: Vec<PathBuf>) {
        self.watch.set_paths(paths);
    }

    /// Waits until no watched file has changed for [`SETTLE`] (at most [`SETTLE_ROUNDS`]
    /// times), so that a file rewritten in place (truncated, then written) is read whole and
    /// not half-way through the write, which could still parse, as a policy with fewer
    /// services. Replacing a file by rename is atomic and needs none of this.
    async fn settle(&mut self) {
        for _ in 0..SETTLE_ROUNDS {
            tokio::time::sleep(SETTLE).await;
            if !self.watch.changed() {
                return;
            }
        }
        tracing::warn!(
            "a watched file kept changing for {:?}; reloading it as it is now",
            SETTLE * SETTLE_ROUNDS
        );
    }

    /// The next trigger. After it, the watched files' current versions count as seen.
    pub async fn next(&mut self) -> Trigger {
        loop {
            tokio::select! {
                got = async {
                    match &mut self.sighup {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if got.is_some() {
                        let _ = self.watch.changed();
                        return Trigger::Signal;
                    }
                    self.sighup = None;
                }
                _ = async {
                    match &mut self.poll {
                        Some(p) => p.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if self.watch.changed() {
                        self.settle().await;
                        return Trigger::FileChanged;
                    }
                }
            }
        }
    }
}

/// Returns a future that keeps `revocation` in step with a deny-list file and CRL files:
/// reloads them on SIGHUP and when one changes (polled every `poll`), until it is dropped. A
/// reload that fails (unreadable file, bad entry, unparsable CRL) keeps the lists in force and
/// logs why. The SIGHUP handler is installed before this returns (SIGHUP's default action would
/// end the process). Used by the connector; the relay reloads them with its policy.
pub fn watch_revocation(
    revocation: std::sync::Arc<crate::tls::Revocation>,
    deny_list: Option<PathBuf>,
    crls: Vec<PathBuf>,
    poll: Option<Duration>,
) -> impl std::future::Future<Output = ()> {
    let files: Vec<PathBuf> = deny_list.iter().chain(&crls).cloned().collect();
    let reloader = Reloader::new(files, poll);
    revocation_loop(revocation, reloader, deny_list, crls)
}

async fn revocation_loop(
    revocation: std::sync::Arc<crate::tls::Revocation>,
    mut reloader: Reloader,
    deny_list: Option<PathBuf>,
    crls: Vec<PathBuf>,
) {
    loop {
        let trigger = reloader.next().await;
        let result = crate::tls::RevocationList::load(deny_list.as_deref(), &crls)
            .and_then(|list| revocation.update(list));
        match result {
            Ok(()) => {
                let l = revocation.list();
                tracing::info!(
                    ?trigger,
                    identities = l.identities.len(),
                    serials = l.serials.len(),
                    crls = l.crls.len(),
                    "deny list reloaded"
                );
            }
            Err(e) => {
                tracing::error!(?trigger, error = %e, "deny list reload failed; the old lists stay in force")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_changes_are_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "x = 1\n").unwrap();
        let mut w = FileWatch::new(vec![a.clone(), b.clone()]);
        assert!(!w.changed());
        // Appearing, growing, replaced by rename (new inode), disappearing.
        std::fs::write(&b, "y").unwrap();
        assert!(w.changed());
        assert!(!w.changed());
        std::fs::write(&a, "x = 1000\n").unwrap();
        assert!(w.changed());
        let tmp = dir.path().join("a.new");
        std::fs::write(&tmp, "x = 1000\n").unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        assert!(w.changed());
        std::fs::remove_file(&b).unwrap();
        assert!(w.changed());
        assert!(!w.changed());
        assert_eq!(w.paths(), vec![a, b]);
    }

    #[tokio::test]
    async fn a_poll_triggers_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        std::fs::write(&a, "1").unwrap();
        let mut r = Reloader::new(vec![a.clone()], Some(Duration::from_millis(20)));
        let quiet = tokio::time::timeout(Duration::from_millis(150), r.next()).await;
        assert!(quiet.is_err(), "no change, no trigger");
        std::fs::write(&a, "22").unwrap();
        let t = tokio::time::timeout(Duration::from_secs(5), r.next()).await;
        assert_eq!(t.ok(), Some(Trigger::FileChanged));
    }

    /// A file rewritten in place in two steps (as `echo > f` then `cat >> f` would) is reloaded
    /// only after the second: a poll that sees the first waits for the file to settle.
    #[tokio::test(start_paused = true)]
    async fn a_poll_waits_for_a_file_written_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        std::fs::write(&a, "").unwrap();
        let start = tokio::time::Instant::now();
        let mut r = Reloader::new(vec![a.clone()], Some(Duration::from_secs(1)));
        let next = tokio::spawn(async move {
            let t = r.next().await;
            (t, tokio::time::Instant::now(), r)
        });
        tokio::time::sleep(Duration::from_millis(900)).await;
        std::fs::write(&a, "[policy]\n").unwrap();
        // The poll at 1 s sees the first step; the second comes during the settling.
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(&a, "[policy]\nservices = []\n").unwrap();
        let (t, at, mut r) = next.await.unwrap();
        assert_eq!(t, Trigger::FileChanged);
        assert!(
            at - start >= Duration::from_secs(1) + SETTLE * 2,
            "reloaded {:?} after the start, before the second write had settled",
            at - start
        );
        assert!(!r.watch.changed(), "the second write counts as seen");
    }
}
