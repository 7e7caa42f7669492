//! Summaries (median and min–max over the iterations), ratios to the reference path, the
//! machine description, and the JSON and markdown outputs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::measure::Iperf;
use crate::paths::REFERENCE;
use crate::relay_fleet::RelayFleet;
use crate::relay_forward::RelayForward;
use crate::relay_scale::RelayScale;
use crate::runner::{Plan, Run};

/// Median and range of one metric over the iterations that measured it.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) n: usize,
}

impl Stat {
    fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// One summarised metric.
struct Metric {
    key: &'static str,
    get: fn(&Run) -> Option<f64>,
}

fn cpu_sum(r: &Run, test: &str) -> Option<f64> {
    r.cpu_percent
        .get(test)
        .filter(|m| !m.is_empty())
        .map(|m| m.values().sum())
}

fn mbps(x: &Option<Iperf>) -> Option<f64> {
    x.as_ref().map(|x| x.mbps)
}

/// Packets per second, in thousands, of a run with 64-byte payloads.
fn small_kpps(x: &Iperf) -> f64 {
    x.mbps * 1e3 / f64::from(crate::measure::SMALL_PAYLOAD * 8)
}

fn retransmits(x: &Option<Iperf>) -> Option<f64> {
    x.as_ref().and_then(|x| x.retransmits).map(|n| n as f64)
}

/// Every metric of the summary, by JSON key.
const METRICS: &[Metric] = &[
    Metric {
        key: "tcp1_mbps",
        get: |r| mbps(&r.tcp1),
    },
    Metric {
        key: "tcp1_retransmits",
        get: |r| retransmits(&r.tcp1),
    },
    Metric {
        key: "tcp4_mbps",
        get: |r| mbps(&r.tcp4),
    },
    Metric {
        key: "tcp4_retransmits",
        get: |r| retransmits(&r.tcp4),
    },
    Metric {
        key: "udp_ok_mbps",
        get: |r| {
            r.udp
                .as_ref()
                .and_then(|u| u.max_ok.as_ref())
                .map(|x| x.mbps)
        },
    },
    Metric {
        key: "udp_unlimited_mbps",
        get: |r| r.udp.as_ref().map(|u| u.unlimited.mbps),
    },
    Metric {
        key: "udp_unlimited_loss_percent",
        get: |r| r.udp.as_ref().and_then(|u| u.unlimited.loss_percent),
    },
    Metric {
        key: "udp_down_mbps",
        get: |r| r.udp_down.as_ref().map(|u| u.unlimited.mbps),
    },
    Metric {
        key: "udp_down_loss_percent",
        get: |r| r.udp_down.as_ref().and_then(|u| u.unlimited.loss_percent),
    },
    Metric {
        key: "udp_down_ok_mbps",
        get: |r| {
            r.udp_down
                .as_ref()
                .and_then(|u| u.max_ok.as_ref())
                .map(|x| x.mbps)
        },
    },
    Metric {
        key: "udp_small_kpps",
        get: |r| r.udp_small.as_ref().map(|u| small_kpps(&u.unlimited)),
    },
    Metric {
        key: "udp_small_loss_percent",
        get: |r| r.udp_small.as_ref().and_then(|u| u.unlimited.loss_percent),
    },
    Metric {
        key: "udp_small_ok_kpps",
        get: |r| {
            r.udp_small
                .as_ref()
                .and_then(|u| u.max_ok.as_ref())
                .map(small_kpps)
        },
    },
    Metric {
        key: "cpu_udp_down_percent",
        get: |r| cpu_sum(r, "udp_down"),
    },
    Metric {
        key: "cpu_udp_small_percent",
        get: |r| cpu_sum(r, "udp_small"),
    },
    Metric {
        key: "ping_avg_ms",
        get: |r| r.ping.as_ref().map(|p| p.avg_ms),
    },
    Metric {
        key: "ping_p99_ms",
        get: |r| r.ping.as_ref().map(|p| p.p99_ms),
    },
    Metric {
        key: "first_packet_s",
        get: |r| r.first_packet_s,
    },
    Metric {
        key: "cpu_tcp1_percent",
        get: |r| cpu_sum(r, "tcp1"),
    },
    Metric {
        key: "cpu_tcp4_percent",
        get: |r| cpu_sum(r, "tcp4"),
    },
    Metric {
        key: "peak_rss_mib",
        get: |r| {
            (!r.peak_rss_kib.is_empty())
                .then(|| r.peak_rss_kib.values().sum::<u64>() as f64 / 1024.0)
        },
    },
];

/// Metrics whose ratio to the reference path is reported (higher is better).
const RATIO_METRICS: &[&str] = &[
    "tcp1_mbps",
    "tcp4_mbps",
    "udp_ok_mbps",
    "udp_unlimited_mbps",
    "udp_down_mbps",
    "udp_down_ok_mbps",
    "udp_small_kpps",
    "udp_small_ok_kpps",
];

/// Per path: metric key → stat.
pub(crate) type Summary = BTreeMap<String, BTreeMap<String, Stat>>;

/// Summarises the runs per path.
pub(crate) fn summarise(paths: &[&str], runs: &[Run]) -> Summary {
    let mut out = Summary::new();
    for &p in paths {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.path == p).collect();
        let mut m = BTreeMap::new();
        for metric in METRICS {
            let values: Vec<f64> = mine.iter().filter_map(|r| (metric.get)(r)).collect();
            if let Some(s) = Stat::of(&values) {
                m.insert(metric.key.to_owned(), s);
            }
        }
        out.insert(p.to_owned(), m);
    }
    out
}

/// Per path: metric → median of the path / median of the reference.
pub(crate) fn ratios(summary: &Summary) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let Some(reference) = summary.get(REFERENCE) else {
        return out;
    };
    for (path, stats) in summary {
        let mut m = BTreeMap::new();
        for &k in RATIO_METRICS {
            if let (Some(a), Some(b)) = (stats.get(k), reference.get(k)) {
                if b.median > 0.0 {
                    m.insert(k.to_owned(), a.median / b.median);
                }
            }
        }
        out.insert(path.clone(), m);
    }
    out
}

/// Where the numbers came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) kernel: String,
    pub(crate) cpu_model: String,
    pub(crate) mem_total_gib: f64,
}

impl Machine {
    pub(crate) fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default(),
            mem_total_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|k| k.parse::<f64>().ok())
                .map_or(0.0, |k| k / 1024.0 / 1024.0),
        }
    }
}

/// A path that was not run, and why.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Skipped {
    pub(crate) path: String,
    pub(crate) reason: String,
}

/// A path that ran.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PathInfo {
    pub(crate) name: String,
    pub(crate) hops: String,
}

/// Everything one invocation measured: what `bench/results/<timestamp>.json` holds.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) started_utc: String,
    pub(crate) finished_utc: String,
    pub(crate) smoke: bool,
    pub(crate) machine: Machine,
    pub(crate) plan: Plan,
    pub(crate) reference: &'static str,
    pub(crate) paths: Vec<PathInfo>,
    pub(crate) skipped: Vec<Skipped>,
    pub(crate) runs: Vec<Run>,
    pub(crate) summary: Summary,
    pub(crate) ratios: BTreeMap<String, BTreeMap<String, f64>>,
    pub(crate) relay_scale: Option<RelayScale>,
    /// Relay forwarding on a veth per `xdp` mode.
    pub(crate) relay_forward: Option<RelayForward>,
    /// Three relays, every agent with a session with each.
    pub(crate) relay_fleet: Option<RelayFleet>,
}

/// The current UTC time as `2026-11-22T06:40:00Z`.
pub(crate) fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// One column of a per-path table.
enum Col {
    /// A metric's median (and range) with this many decimals.
    Stat(&'static str, usize),
    /// A metric's ratio to the reference path.
    Ratio(&'static str),
    /// Two metrics' medians as `a / b`, without decimals.
    Pair(&'static str, &'static str),
}

fn fmt_stat(s: Option<&Stat>, digits: usize) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 => format!("{:.*}", digits, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        ),
    }
}

fn fmt_ratio(r: Option<&f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}×"))
}

impl Report {
    /// The markdown tables of `bench/results/latest.md`.
    /// A markdown table with a row per path: `title`, then the `path` column and `headers`,
    /// with one cell per column of `cols`.
    fn path_table(&self, s: &mut String, title: &str, headers: &[String], cols: &[Col]) {
        let _ = writeln!(s, "{title}\n");
        let _ = writeln!(s, "| path | {} |", headers.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(headers.len()));
        for p in &self.paths {
            let st = self.summary.get(&p.name);
            let get = |k: &str| st.and_then(|m| m.get(k));
            let cells: Vec<String> = cols
                .iter()
                .map(|c| match *c {
                    Col::Stat(k, digits) => fmt_stat(get(k), digits),
                    Col::Ratio(k) => fmt_ratio(self.ratios.get(&p.name).and_then(|m| m.get(k))),
                    Col::Pair(a, b) => format!("{} / {}", fmt_stat(get(a), 0), fmt_stat(get(b), 0)),
                })
                .collect();
            let _ = writeln!(s, "| {} | {} |", p.name, cells.join(" | "));
        }
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ =
            writeln!(
            s,
            "# ztna benchmark results\n\n{} to {}{}. Machine: {} CPUs ({}), {:.0} GiB, Linux {}.\n\
             Each cell is the median of {} iteration(s), with the min–max in brackets; \
             ratios are medians divided by {REFERENCE}'s, in the same run.\n",
            self.started_utc,
            self.finished_utc,
            if self.smoke { " (smoke run: short tests, not comparable)" } else { "" },
            m.nproc,
            m.cpu_model,
            m.mem_total_gib,
            m.kernel,
            self.plan.iterations
        );
        let r = REFERENCE;
        self.path_table(
            &mut s,
            "## Throughput (Mbit/s received)",
            &[
                "TCP 1 stream".into(),
                format!("× {r}"),
                "TCP 4 streams".into(),
                format!("× {r}"),
                "UDP, < 1 % loss".into(),
                format!("× {r}"),
                "UDP at -b 0".into(),
                "loss at -b 0 (%)".into(),
            ],
            &[
                Col::Stat("tcp1_mbps", 0),
                Col::Ratio("tcp1_mbps"),
                Col::Stat("tcp4_mbps", 0),
                Col::Ratio("tcp4_mbps"),
                Col::Stat("udp_ok_mbps", 0),
                Col::Ratio("udp_ok_mbps"),
                Col::Stat("udp_unlimited_mbps", 0),
                Col::Stat("udp_unlimited_loss_percent", 1),
            ],
        );
        self.path_table(
            &mut s,
            "\n## UDP backend → agent (the direction of backend replies; the connector's XDP fast path): with < 1 % loss, and at -b 0",
            &[
                "1200 B, < 1 % loss (Mbit/s)".into(),
                format!("× {r}"),
                "1200 B at -b 0 (Mbit/s)".into(),
                format!("× {r}"),
                "loss (%)".into(),
                "daemons' CPU (% of a core)".into(),
                "64 B, < 1 % loss (kpkt/s)".into(),
                format!("× {r}"),
                "64 B at -b 0 (kpkt/s)".into(),
                format!("× {r}"),
                "loss (%)".into(),
                "daemons' CPU".into(),
            ],
            &[
                Col::Stat("udp_down_ok_mbps", 0),
                Col::Ratio("udp_down_ok_mbps"),
                Col::Stat("udp_down_mbps", 0),
                Col::Ratio("udp_down_mbps"),
                Col::Stat("udp_down_loss_percent", 1),
                Col::Stat("cpu_udp_down_percent", 0),
                Col::Stat("udp_small_ok_kpps", 1),
                Col::Ratio("udp_small_ok_kpps"),
                Col::Stat("udp_small_kpps", 1),
                Col::Ratio("udp_small_kpps"),
                Col::Stat("udp_small_loss_percent", 1),
                Col::Stat("cpu_udp_small_percent", 0),
            ],
        );
        self.path_table(
            &mut s,
            "\n## Latency, setup and cost",
            &[
                "ping avg (ms)".into(),
                "ping p99 (ms)".into(),
                "up → first echo (s)".into(),
                "TCP retransmits 1 / 4 streams".into(),
                "daemons' CPU, TCP 1 stream (% of a core)".into(),
                "daemons' CPU, TCP 4 streams".into(),
                "daemons' peak RSS (MiB)".into(),
            ],
            &[
                Col::Stat("ping_avg_ms", 3),
                Col::Stat("ping_p99_ms", 3),
                Col::Stat("first_packet_s", 2),
                Col::Pair("tcp1_retransmits", "tcp4_retransmits"),
                Col::Stat("cpu_tcp1_percent", 0),
                Col::Stat("cpu_tcp4_percent", 0),
                Col::Stat("peak_rss_mib", 1),
            ],
        );
        let _ = writeln!(s, "\n## Paths\n");
        for p in &self.paths {
            let _ = writeln!(s, "- `{}`: {}", p.name, p.hops);
        }
        for k in &self.skipped {
            let _ = writeln!(s, "- `{}`: skipped: {}", k.path, k.reason);
        }
        let errors: Vec<&Run> = self.runs.iter().filter(|r| r.error.is_some()).collect();
        if !errors.is_empty() {
            let _ = writeln!(s, "\n## Failed runs\n");
            for r in errors {
                let first = r
                    .error
                    .as_deref()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default();
                let _ = writeln!(s, "- `{}` iteration {}: {}", r.path, r.iteration + 1, first);
            }
        }
        let test_errors: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| {
                r.test_errors.iter().map(move |(test, e)| {
                    let first = e.lines().next().unwrap_or_default();
                    format!(
                        "- `{}` iteration {}, {test}: {first}",
                        r.path,
                        r.iteration + 1
                    )
                })
            })
            .collect();
        if !test_errors.is_empty() {
            let _ = writeln!(s, "\n## Tests left out (failed twice; the run went on)\n");
            let _ = writeln!(s, "{}", test_errors.join("\n"));
        }
        let _ = writeln!(s, "\n## Background load\n");
        let loads: Vec<_> = self.runs.iter().flat_map(|r| r.load.values()).collect();
        let busy = Stat::of(&loads.iter().map(|l| l.busy * 100.0).collect::<Vec<_>>());
        let avg = Stat::of(&loads.iter().map(|l| l.loadavg_1m).collect::<Vec<_>>());
        let not_quiet = loads.iter().filter(|l| !l.quiet).count();
        let _ = writeln!(
            s,
            "Before each of {} tests the bench waited up to {} s for the CPUs to be less than {:.0} % busy \
             over one second. CPU busy before a test: {} %; 1-minute load average: {}; \
             {} test(s) started without the machine getting quiet.",
            loads.len(),
            self.plan.quiet_max_wait_s,
            self.plan.quiet_threshold * 100.0,
            fmt_stat(busy.as_ref(), 0),
            fmt_stat(avg.as_ref(), 2),
            not_quiet
        );
        let _ = writeln!(s, "\n## Goals\n");
        let _ = writeln!(s, "{}", self.goal_note());
        if let Some(rs) = &self.relay_scale {
            let _ = writeln!(s, "\n{}", rs.markdown());
        }
        if let Some(rf) = &self.relay_forward {
            let _ = writeln!(s, "\n{}", rf.markdown());
        }
        if let Some(fl) = &self.relay_fleet {
            let _ = writeln!(s, "\n{}", fl.markdown());
        }
        s
    }

    /// Where ztna stands against the goals: single-stream TCP on the relay path ≥ 2× and on
    /// the direct path ≥ 8× boringtun (4 streams ≥ 4×); the connector's XDP fast path against
    /// its per-flow sockets (`ztna-direct-xdp` against `ztna-direct`, backend → agent UDP with
    /// < 1 % loss) ≥ 2× at 64 bytes and ≥ 1.2× at 1200 bytes.
    fn goal_note(&self) -> String {
        let ratio = |p: &str, k: &str| self.ratios.get(p).and_then(|m| m.get(k)).copied();
        let verdict = |r: f64, goal: f64| if r >= goal { "met" } else { "not met" };
        let line = |p: &str, k: &str, what: &str, goal: f64| match ratio(p, k) {
            Some(r) => format!(
                "- `{p}`: {r:.2}× {REFERENCE} on {what}; goal {goal}× — {}.",
                verdict(r, goal)
            ),
            None => format!("- `{p}`: {what} not measured in this run (goal {goal}× {REFERENCE})."),
        };
        let median =
            |p: &str, k: &str| self.summary.get(p).and_then(|m| m.get(k)).map(|s| s.median);
        let xdp = |k: &str, what: &str, goal: f64| {
            match (median("ztna-direct-xdp", k), median("ztna-direct", k)) {
                (Some(on), Some(off)) if off > 0.0 => format!(
                    "- `ztna-direct-xdp`: {:.2}× `ztna-direct` (XDP on against off) on {what}; goal {goal}× — {}.",
                    on / off,
                    verdict(on / off, goal)
                ),
                _ => format!(
                    "- `ztna-direct-xdp` against `ztna-direct`: {what} not measured in this run (goal {goal}×)."
                ),
            }
        };
        [
            line("ztna-relay", "tcp1_mbps", "single-stream TCP", 2.0),
            line("ztna-direct", "tcp1_mbps", "single-stream TCP", 8.0),
            line("ztna-direct", "tcp4_mbps", "TCP with 4 streams", 4.0),
            xdp(
                "udp_small_ok_kpps",
                "backend → agent packets per second with < 1 % loss, 64-byte payloads",
                2.0,
            ),
            xdp(
                "udp_down_ok_mbps",
                "backend → agent UDP with < 1 % loss, 1200-byte payloads",
                1.2,
            ),
            xdp("udp_small_kpps", "the same at -b 0, 64-byte payloads", 2.0),
            xdp("udp_down_mbps", "the same at -b 0, 1200-byte payloads", 1.2),
        ]
        .join("\n")
    }

    /// Writes `<dir>/<stamp>.json`, `<dir>/latest.json` and `<dir>/latest.md`; returns the
    /// JSON path.
    pub(crate) fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self).context("serialising the results")?;
        let stamp: String = self
            .started_utc
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let file = dir.join(format!("{stamp}.json"));
        for p in [file.clone(), dir.join("latest.json")] {
            std::fs::write(&p, &json).with_context(|| format!("writing {}", p.display()))?;
        }
        let md = dir.join("latest.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).expect("stat");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stat::of(&[4.0, 1.0, f64::NAN, 2.0, 3.0]).expect("stat");
        assert_eq!((s.median, s.n), (2.5, 4));
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn ratios_divide_medians_by_the_reference() {
        let run = |path: &str, mbps: f64| Run {
            path: path.into(),
            tcp1: Some(Iperf {
                mbps,
                ..Default::default()
            }),
            ..Run::default()
        };
        let runs = vec![
            run(REFERENCE, 500.0),
            run(REFERENCE, 700.0),
            run("x", 1200.0),
        ];
        let summary = summarise(&[REFERENCE, "x"], &runs);
        let r = ratios(&summary);
        assert_eq!(r["x"]["tcp1_mbps"], 2.0);
        assert_eq!(r[REFERENCE]["tcp1_mbps"], 1.0);
    }
}
