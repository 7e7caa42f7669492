//! Log lines to the platform: a tracing subscriber whose writer hands each formatted line to the
//! log callback (the Swift side sends it to `os_log`). It is installed as the default only on
//! the tunnel's own thread, so two tunnels in one process never mix their logs and nothing is
//! logged through a callback after that thread has ended.

use std::ffi::CString;
use std::io;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::Callbacks;

/// `ZTNA_LOG_*` level of a tracing level.
fn level_code(level: &Level) -> i32 {
    match *level {
        Level::ERROR => crate::ZTNA_LOG_ERROR,
        Level::WARN => crate::ZTNA_LOG_WARN,
        Level::INFO => crate::ZTNA_LOG_INFO,
        Level::DEBUG => crate::ZTNA_LOG_DEBUG,
        Level::TRACE => crate::ZTNA_LOG_TRACE,
    }
}

/// Makes one [`LineWriter`] per event.
#[derive(Clone)]
struct MakeLine {
    cb: Callbacks,
}

/// Collects one formatted event and hands it to the callback when dropped.
struct LineWriter {
    cb: Callbacks,
    level: i32,
    buf: Vec<u8>,
}

impl io::Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        while self.buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            self.buf.pop();
        }
        if self.buf.is_empty() {
            return;
        }
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.retain(|b| *b != 0);
        if let Ok(line) = CString::new(bytes) {
            self.cb.log(self.level, &line);
        }
    }
}

impl<'a> MakeWriter<'a> for MakeLine {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            cb: self.cb,
            level: crate::ZTNA_LOG_INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            cb: self.cb,
            level: level_code(meta.level()),
            buf: Vec::with_capacity(128),
        }
    }
}

/// Checks a log filter (tracing `EnvFilter` syntax).
pub(crate) fn check_filter(filter: &str) -> anyhow::Result<()> {
    EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("`log` = {filter:?}: {e}"))?;
    Ok(())
}

/// The subscriber of one tunnel, or `None` when there is no log callback.
pub(crate) fn dispatch(cb: &Callbacks, filter: &str) -> Option<tracing::Dispatch> {
    if !cb.has_log() {
        return None;
    }
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_writer(MakeLine { cb: *cb })
        .finish();
    Some(tracing::Dispatch::new(sub))
}
