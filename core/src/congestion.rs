//! The congestion controller of ztna's QUIC connections: one that carries users' packets
//! without putting a second congestion control under their TCP.
//!
//! Every QUIC connection of ztna (the inner one agent ↔ connector, the outer ones to the relay)
//! mostly carries users' IP packets as unreliable datagrams. The users' own transports (TCP's
//! CUBIC or BBR) already react to loss and delay end to end; a loss-based controller in the
//! tunnel (quinn's default CUBIC, or its BBR with its loss recovery and ProbeRTT) backs off on
//! every random loss and turns 1 % of path loss into far more loss and delay for the user.
//! WireGuard has no controller at all; this one stays close to that while still pacing and
//! bounding what is in flight, so that an unresponsive sender (a UDP flood through the tunnel)
//! cannot push more than the path delivers:
//!
//! - **Bandwidth:** the delivery rate (acknowledged bytes per interval of about one minimum
//!   RTT), max-filtered over the last [`BW_INTERVALS`] intervals. An interval in which the
//!   sender never filled the window (quinn's app-limited flag) measured the sender, not the
//!   path: its sample only counts when it is higher than the estimate (as in BBR). Without
//!   this, the keepalives of a quiet minute replaced the estimate and the next flow started
//!   from the minimum window again.
//! - **Minimum RTT:** the smallest RTT sample (ack time − send time) seen in the last
//!   [`MIN_RTT_WINDOW`]; it expires so that a path change (relay → direct) is followed, and
//!   the smallest sample of the window's second half takes its place. A path
//!   that got longer is followed sooner: when every RTT sample stays above the minimum by more
//!   than a queue the tunnel could have built ([`elevation_margin`]) for [`DRAIN_PROOF_RTTS`]
//!   smoothed RTTs while the tunnel drains (its congested state, gain 1 over the minimum RTT),
//!   the queue is not the tunnel's and the smallest of those samples becomes the minimum.
//!   Without this, the stale minimum made every random loss on the longer path look like
//!   congestion and shrank the window below the path's bandwidth-delay product for 10 s. A
//!   path that got longer with nothing lost is found the same way: when every sample of an
//!   interval lies beyond the RTT the window covers (below), the tunnel drains to tell a
//!   longer path from its own queue (which ends the drain as soon as it is gone). Without
//!   this, a path from 0.1 to 150 ms starved the window to its 32-packet minimum (2 Mbit/s)
//!   until the minimum expired.
//! - **Window:** `GAIN × bandwidth × (RTT + QUEUE_ALLOWANCE)`, between [`MIN_WINDOW_PACKETS`]
//!   packets and [`MAX_WINDOW`], where RTT is the smoothed RTT kept between the minimum and
//!   3 × the minimum + [`RTT_CAP_SLACK`] (so a stale minimum after the path got longer does not
//!   starve the window, and a flood into a deep queue does not grow its own queue without
//!   bound). Gain 2.5 lets the delivery rate more than double per RTT, faster
//!   than a user's TCP in slow start, so the tunnel never limits a user's TCP that the path can
//!   carry. quinn paces at 1.25 × window / smoothed RTT.
//! - **Startup:** a fresh connection starts at [`MIN_WINDOW_PACKETS`] and, until the path is
//!   full, the window is at least a startup window that grows by [`STARTUP_GROWTH`] × every
//!   byte acknowledged while the window limited the sender (ack-clocked, 2.5 × per round trip,
//!   like TCP's slow start but faster than the user's TCP inside it). Growing from the delivery
//!   rate alone lags a round trip behind each measurement (about 1.5 × per round trip): at
//!   150 ms the tunnel took 1.45 s to fill 100 Mbit/s and dropped the packets of a user's TCP
//!   whose slow start was faster than that. Startup ends when the delivery rate grew by less
//!   than a quarter for [`STARTUP_FLAT_INTERVALS`] window-limited intervals, when the path
//!   queues, or on a loss while it queues; persistent congestion and a path found longer start
//!   it over (a path that got longer reads as a queue and ends it). A sender with
//!   less to send than the window does not grow the startup window, and neither does any
//!   sender while the path is congested. A flow after a quiet spell starts from the rate
//!   estimate the quiet spell kept (above); once that estimate ages out ([`BW_KEEP`]),
//!   startup begins again from a quarter of the window it had.
//! - **Loss alone does nothing.** A loss only counts as congestion when the path is queueing:
//!   when the smallest RTT sample of the last interval exceeds the minimum by
//!   [`QUEUE_DELAY_THRESHOLD`] (random loss happens at any RTT; a full bottleneck queue comes
//!   with its delay). Then, for [`CONGESTED_HOLD_RTTS`] smoothed RTTs, the gain drops to 1:
//!   the window is one bandwidth-delay product plus the allowance, the rate the path delivers,
//!   and the queue the tunnel keeps at the bottleneck is bounded by [`QUEUE_ALLOWANCE`] of
//!   delay, or, on paths of 8 ms and more, by the congestion threshold and an eighth of the
//!   minimum RTT: the window covers a queue that another flow keeps standing beyond the
//!   allowance, up to that bound, so that beside BBR it does not send less than its estimate
//!   every round trip and shrink towards the minimum window. After that the
//!   gain climbs back to [`GAIN`] over [`RECOVERY_RTTS`] smoothed RTTs (the window still
//!   covering the minimum RTT meanwhile). When it jumped back at once, an unresponsive sender
//!   (a UDP flood, or the TCP carriage stream, which always has more) refilled the
//!   bottleneck's queue within a round trip every cycle: 60–65 Mbit/s into a 50 Mbit/s
//!   bottleneck; climbing, it probes gently, about 49.
//! - **Persistent congestion** (quinn's: everything lost for several PTOs, a dead path) resets
//!   the estimates to the initial window.
//! - **Reliable streams** that always have more to send (the TCP carriage) are held to what the
//!   path delivers in about two round trips ([`Estimator::stream_window`]), not to the window:
//!   what a stream holds is what the next byte written waits behind.
//!
//! The control stream and the handshakes share the connection and this controller: they are a
//! few packets, which always fit [`MIN_WINDOW_PACKETS`], and quinn retransmits their losses as
//! usual; only datagrams are not retransmitted.
//!
//! [`Estimator`] is the pure logic, driven with injected time; [`Carriage`] adapts it to quinn's
//! `Controller` trait.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Window gain over the estimated bandwidth-delay product in the normal state.
pub const GAIN: f64 = 2.5;
/// Window gain while the path is congested (a loss while the path queues).
pub const CONGESTED_GAIN: f64 = 1.0;
/// How many smoothed RTTs the congested state lasts after the last congestion loss.
pub const CONGESTED_HOLD_RTTS: u32 = 4;
/// Smoothed RTTs over which the gain climbs back from [`CONGESTED_GAIN`] to [`GAIN`] after the
/// congested state (see the module documentation).
pub const RECOVERY_RTTS: u32 = 4;
/// Extra delay the window allows on top of the minimum RTT (a bottleneck queue of this much is
/// normal operation, not congestion).
pub const QUEUE_ALLOWANCE: Duration = Duration::from_millis(5);
/// See [`Estimator`]'s window: the RTT it covers is at most 3 × the minimum + this.
pub const RTT_CAP_SLACK: Duration = Duration::from_millis(10);
/// How much the smallest recent RTT sample must exceed the minimum RTT for a loss to count as
/// congestion.
pub const QUEUE_DELAY_THRESHOLD: Duration = Duration::from_millis(4);
/// Smallest window, in packets of the current MTU: handshakes, the control stream and a user's
/// initial burst always fit.
pub const MIN_WINDOW_PACKETS: u64 = 32;
/// Largest window: about 1 Gbit/s over 250 ms.
pub const MAX_WINDOW: u64 = 32 << 20;
/// How long app-limited samples below the estimate leave it alone ([`Estimator::on_ack`]):
/// after that they count again, so an estimate that nothing window-limited has confirmed for
/// this long ages out of the filter within [`BW_INTERVALS`] intervals.
pub const BW_KEEP: Duration = Duration::from_secs(10);
/// Delivery-rate intervals the bandwidth max-filter spans.
pub const BW_INTERVALS: usize = 10;
/// Shortest and longest delivery-rate interval (it follows the minimum RTT in between).
pub const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// See [`MIN_INTERVAL`].
pub const MAX_INTERVAL: Duration = Duration::from_millis(200);
/// How long a minimum RTT sample stays valid.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Growth of the startup window per byte acknowledged while the window limits the sender:
/// 1.5 makes it 2.5 × per round trip, ahead of a user's TCP in slow start (2 ×).
pub const STARTUP_GROWTH: f64 = 1.5;
/// Startup ends after this many window-limited intervals in a row in which the delivery rate
/// grew by less than a quarter (the path is full).
pub const STARTUP_FLAT_INTERVALS: u32 = 3;
/// Smoothed RTTs the RTT must stay elevated while the tunnel drains before the elevated
/// minimum is taken as the path's (see the module documentation).
pub const DRAIN_PROOF_RTTS: u32 = 2;

/// How far a reliable stream may run ahead of what the path delivers, beyond the round trips
/// it needs ([`Estimator::stream_window`]).
pub const STREAM_AHEAD: Duration = Duration::from_millis(10);

/// How far above `min` the smallest RTT sample of an interval must be for the path to count
/// as longer rather than queueing behind the tunnel's own traffic: the queue the window allows
/// ([`QUEUE_ALLOWANCE`]), the congestion threshold, and an eighth of the minimum for jitter.
pub fn elevation_margin(min: Duration) -> Duration {
    QUEUE_ALLOWANCE + QUEUE_DELAY_THRESHOLD + min / 8
}

/// The pure state of the controller.
#[derive(Debug, Clone)]
pub struct Estimator {
    mtu: u64,
    /// Delivery-rate samples in bytes per second, newest last.
    bw: [u64; BW_INTERVALS],
    bw_next: usize,
    /// When each sample was taken.
    bw_at: [Instant; BW_INTERVALS],
    /// The interval being measured: its start and the bytes acknowledged since.
    interval_start: Instant,
    interval_acked: u64,
    /// Whether the current interval saw an ack while the window or pacing limited the
    /// sender (quinn's app-limited flag clear).
    interval_limited: bool,
    /// Smallest RTT sample of the current interval, and of the previous one.
    interval_min_rtt: Option<Duration>,
    recent_min_rtt: Option<Duration>,
    /// The windowed minimum RTT, when it was sampled, and the smallest sample since that is a
    /// candidate to replace it when it expires.
    min_rtt: Option<Duration>,
    min_rtt_at: Instant,
    next_min_rtt: Option<Duration>,
    smoothed_rtt: Duration,
    congested_until: Option<Instant>,
    /// When the last congested state after a congestion loss ends: the gain climbs back from
    /// then ([`RECOVERY_RTTS`]).
    recover_from: Option<Instant>,
    congestion_events: u64,
    /// Since when every interval's smallest RTT sample stayed above the minimum by the
    /// elevation margin while congested, and the smallest of those samples.
    elevated: Option<(Instant, Duration)>,
    /// Times the minimum RTT was raised because the path got longer.
    path_longer: u64,
    /// Whether the current drain was started because the RTT went beyond what the window
    /// covers (not by a loss), and how many such drains there were.
    probing: bool,
    drain_probes: u64,
    startup: Startup,
    window: u64,
    /// Whether the congested state held at the last window update ([`Self::stream_window`]).
    congested_at_update: bool,
}

/// The startup phase (see the module documentation): a window that grows with what is
/// acknowledged, ack-clocked like TCP's slow start, until the path is full.
#[derive(Debug, Clone, Default)]
struct Startup {
    /// Whether the controller is in startup.
    on: bool,
    /// The startup window, bytes.
    window: u64,
    /// The delivery rate at the last interval that grew it by a quarter.
    bw: u64,
    /// Window-limited intervals since then.
    flat: u32,
    /// How many times startup ended.
    exits: u64,
}

impl Startup {
    /// Starts (again) from `window`, keeping the count of exits.
    fn restart(&mut self, window: u64) {
        self.on = true;
        self.window = window;
        self.bw = 0;
        self.flat = 0;
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.on) {
            self.exits += 1;
        }
    }
}

impl Estimator {
    /// A fresh estimator at `now` for packets of `mtu` bytes.
    pub fn new(now: Instant, mtu: u16) -> Self {
        let mut e = Self {
            mtu: u64::from(mtu),
            bw: [0; BW_INTERVALS],
            bw_next: 0,
            bw_at: [now; BW_INTERVALS],
            interval_start: now,
            interval_acked: 0,
            interval_limited: false,
            interval_min_rtt: None,
            recent_min_rtt: None,
            min_rtt: None,
            min_rtt_at: now,
            next_min_rtt: None,
            smoothed_rtt: Duration::from_millis(100),
            congested_until: None,
            recover_from: None,
            congestion_events: 0,
            elevated: None,
            path_longer: 0,
            probing: false,
            drain_probes: 0,
            startup: Startup::default(),
            window: 0,
            congested_at_update: false,
        };
        e.window = e.min_window();
        e.startup.restart(e.window);
        e
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// The current window in bytes.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Bytes a reliable stream on this connection should hold written and not yet acknowledged
    /// (quinn's send window, sent or waiting to be).
    ///
    /// The TCP carriage stream is one ordered queue for every TCP connection the connector
    /// carries to an agent, and its writer always has more (the connector's TCP stack fills
    /// whatever room it gets). With a send window of the agent's whole receive window (4 MiB),
    /// or of a multiple of this controller's window (itself 2.5 × the bandwidth-delay product
    /// so that a user's TCP can grow), every segment waited behind the bytes ahead of it: a
    /// TCP ping behind a download took 120–170 ms on a 20 ms path through a 50 Mbit/s
    /// bottleneck. So, outside startup, the stream holds what the path delivers in two minimum
    /// RTTs and [`STREAM_AHEAD`], and at least two minimum windows: one round trip in flight,
    /// one for repairing a loss (quinn counts the bytes acknowledged beyond a hole against the
    /// send window until the hole is filled, so a window of one round trip stalls the stream
    /// for a round trip per loss), and room to grow 2 × per round trip as the delivery rate
    /// grows. In startup it holds one and a half windows, so that the window, not the stream,
    /// limits the sender and startup goes on growing.
    ///
    /// Outside startup the window does not cap it (it is at most about two windows anyway: the
    /// window covers at least the bandwidth over the minimum RTT and [`QUEUE_ALLOWANCE`]). A cap
    /// of one and a half windows bit in the congested state, where the window covers only the
    /// minimum RTT: beside another flow's standing queue, a loss's repair (two RTTs with that
    /// queue) no longer fit, the stream stalled on every loss, and against a BBR flow a
    /// download kept 0.16 of the bottleneck on average over the simulation's grid
    /// (`shares_a_bottleneck_with_another_flow`; 0.16–0.20 in the bench), 0.21 without the cap
    /// (0.23–0.34 in the bench).
    ///
    /// In the congested state the round trips it covers are the smoothed RTT's (between the
    /// minimum and the minimum plus the [`elevation_margin`]), not the minimum's: there the
    /// window keeps the tunnel's own queue near [`QUEUE_ALLOWANCE`], and a repair waits behind
    /// whatever queue another flow keeps standing as well.
    pub fn stream_window(&self) -> u64 {
        if self.startup.on {
            return self.window.saturating_add(self.window / 2);
        }
        // The minimum RTT, not the smoothed one: that includes the queue the stream itself
        // builds, and the window would grow with its own queue. Except in the congested state,
        // where the window holds the tunnel's own queue near [`QUEUE_ALLOWANCE`]: a repair
        // there waits behind another flow's standing queue too, so the stream covers the
        // smoothed RTT, up to the elevation margin.
        let min = self.min_rtt.unwrap_or(self.smoothed_rtt);
        let rtt = if self.congested_at_update {
            self.smoothed_rtt.clamp(min, min + elevation_margin(min))
        } else {
            min
        };
        let w = (self.bandwidth() as f64 * (2 * rtt + STREAM_AHEAD).as_secs_f64()) as u64;
        w.max(2 * self.min_window())
    }

    /// The max-filtered delivery rate, bytes per second.
    pub fn bandwidth(&self) -> u64 {
        self.bw.iter().copied().max().unwrap_or(0)
    }

    /// When the sample [`Self::bandwidth`] comes from was taken (the newest, if several).
    fn bandwidth_at(&self) -> Instant {
        let max = self.bandwidth();
        self.bw
            .iter()
            .zip(&self.bw_at)
            .filter(|(b, _)| **b == max)
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(self.interval_start)
    }

    /// The windowed minimum RTT, once sampled.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// Times the minimum RTT was raised before it expired because the path got longer.
    pub fn path_longer(&self) -> u64 {
        self.path_longer
    }

    /// Drains started because the RTT went beyond what the window covers.
    pub fn drain_probes(&self) -> u64 {
        self.drain_probes
    }

    /// Whether the controller is in its startup phase.
    pub fn in_startup(&self) -> bool {
        self.startup.on
    }

    /// How many times the startup phase ended.
    pub fn startup_exits(&self) -> u64 {
        self.startup.exits
    }

    /// Losses that counted as congestion so far.
    pub fn congestion_events(&self) -> u64 {
        self.congestion_events
    }

    /// Whether the controller is in its congested state at `now`.
    pub fn congested(&self, now: Instant) -> bool {
        self.congested_until.is_some_and(|u| now < u)
    }

    fn interval(&self) -> Duration {
        self.min_rtt
            .unwrap_or(MIN_INTERVAL)
            .clamp(MIN_INTERVAL, MAX_INTERVAL)
    }

    /// `bytes` sent at `sent` were acknowledged at `now`; `smoothed_rtt` is the connection's;
    /// `app_limited`: the sender had less to send than the window allowed (quinn's flag).
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        smoothed_rtt: Duration,
        app_limited: bool,
    ) {
        self.smoothed_rtt = smoothed_rtt;
        if !app_limited {
            self.interval_limited = true;
            if self.startup.on {
                // Only a window-limited sender grows it: a slow flow must not earn a window
                // it never used (RFC 7661's reasoning).
                let grow = (bytes as f64 * STARTUP_GROWTH) as u64;
                self.startup.window = self.startup.window.saturating_add(grow).min(MAX_WINDOW);
            }
        }
        let sample = now.saturating_duration_since(sent);
        self.interval_min_rtt = Some(self.interval_min_rtt.map_or(sample, |m| m.min(sample)));
        let age = now.saturating_duration_since(self.min_rtt_at);
        // The candidate to replace the minimum when it expires: the smallest sample of the
        // window's second half only. With every sample since the minimum, the samples taken
        // just after it on the old path (a few µs above it) replaced it, and a path that got
        // longer was followed only after a second window: 20 s in which the carriage stream's
        // window (on the minimum RTT) held a download through 60 ms to a third of the path.
        if age >= MIN_RTT_WINDOW / 2 {
            self.next_min_rtt = Some(self.next_min_rtt.map_or(sample, |m| m.min(sample)));
        }
        let expired = age >= MIN_RTT_WINDOW;
        match self.min_rtt {
            Some(m) if sample <= m => {
                self.min_rtt = Some(sample);
                self.min_rtt_at = now;
                self.next_min_rtt = None;
            }
            None => {
                self.min_rtt = Some(sample);
                self.min_rtt_at = now;
                self.next_min_rtt = None;
            }
            Some(_) if expired => {
                // The old minimum is stale: the smallest sample of the window's second half
                // takes its place.
                self.min_rtt = Some(self.next_min_rtt.take().unwrap_or(sample));
                self.min_rtt_at = now;
            }
            Some(_) => {}
        }
        self.interval_acked = self.interval_acked.saturating_add(bytes);
        let elapsed = now.saturating_duration_since(self.interval_start);
        if elapsed >= self.interval() {
            let rate = (u128::from(self.interval_acked) * 1_000_000_000 / elapsed.as_nanos().max(1))
                as u64;
            let limited = std::mem::take(&mut self.interval_limited);
            // A sender with less to send than the window measures its own rate, not the
            // path's: such a sample only counts when it is higher (as in BBR), so an idle
            // connection (keepalives only) keeps what it learnt of the path, for [`BW_KEEP`]
            // after the estimate's sample. Without that bound an overestimate (a burst of
            // late ACKs after reordering measured 830 Mbit/s on a path carrying 450) stayed for
            // good under app-limited traffic, the window with it, and the tunnel later flooded
            // a 50 Mbit/s bottleneck at 200 Mbit/s.
            let estimate = self.bandwidth();
            let stale = now.saturating_duration_since(self.bandwidth_at()) >= BW_KEEP;
            if limited || stale || rate >= estimate {
                self.bw[self.bw_next] = rate;
                self.bw_at[self.bw_next] = now;
                self.bw_next = (self.bw_next + 1) % BW_INTERVALS;
            }
            if stale && !limited && rate < estimate && !self.startup.on {
                // The estimate is ageing out: the next flow ramps in startup (2.5 × per round
                // trip) from a quarter of the window it kept, not at the delivery rate's pace
                // (about 1.5 × per round trip), which at 150 ms lost a sixth of a 100 Mbit/s UDP
                // stream that began 15 s after the last window-limited flow. From the minimum
                // window, as a fresh connection, it still lost a ninth.
                self.startup.restart(self.window / 4);
            }
            self.interval_start = now;
            self.interval_acked = 0;
            self.recent_min_rtt = self.interval_min_rtt.take();
            self.startup_at_interval_end(limited);
            self.follow_a_longer_path(now);
        }
        self.update_window(now);
    }

    /// At the end of an interval (`limited`: the window limited the sender during it):
    /// startup ends when the path queues (the smallest RTT sample of the interval above the
    /// minimum by the elevation margin) or when the delivery rate of a window-limited sender
    /// stopped growing.
    ///
    /// It starts again after persistent congestion and when the path got longer
    /// ([`Self::follow_a_longer_path`]), and when the estimate ages out after [`BW_KEEP`]
    /// with nothing window-limited, but not after a shorter quiet spell: the rate estimate
    /// outlives it (see [`Self::on_ack`]). Starting it again whenever an interval found the
    /// sender below the window let a UDP flood, whose sender falls short of the window now and then, overshoot
    /// a 50 Mbit/s bottleneck at 115 Mbit/s (60 without), since that bottleneck's 10 ms queue
    /// never showed the delay that ends startup.
    fn startup_at_interval_end(&mut self, limited: bool) {
        if !self.startup.on {
            return;
        }
        if let (Some(min), Some(recent)) = (self.min_rtt, self.recent_min_rtt) {
            if recent > min + elevation_margin(min) {
                self.startup.end();
                return;
            }
        }
        if !limited {
            return;
        }
        let bw = self.bandwidth();
        if bw >= self.startup.bw.saturating_add(self.startup.bw / 4) {
            self.startup.bw = bw;
            self.startup.flat = 0;
        } else {
            self.startup.flat += 1;
            if self.startup.flat >= STARTUP_FLAT_INTERVALS {
                self.startup.end();
            }
        }
    }

    /// At the end of an interval: raises the minimum RTT when the path got longer (see the
    /// module documentation).
    fn follow_a_longer_path(&mut self, now: Instant) {
        let (Some(min), Some(recent)) = (self.min_rtt, self.recent_min_rtt) else {
            return;
        };
        if recent <= min + elevation_margin(min) {
            self.elevated = None;
            if std::mem::take(&mut self.probing) {
                // The queue was the tunnel's own and has drained: back to the normal gain.
                self.congested_until = None;
                self.recover_from = None;
            }
            return;
        }
        if !self.congested(now) {
            self.elevated = None;
            // Every sample of the interval lies beyond the RTT the window covers (3 × the
            // minimum + slack): either the tunnel's own queue (a flood) or a path that got
            // longer with nothing lost (a roam from a LAN to a mobile network), under which
            // the window, capped by the stale minimum, would starve the connection until the
            // minimum expires. Drain to tell which: the proof below follows a longer path,
            // and the tunnel's own queue ends the drain as soon as it is gone.
            if recent > min * 3 + RTT_CAP_SLACK {
                self.probing = true;
                self.drain_probes += 1;
                self.congested_until =
                    Some(now + (DRAIN_PROOF_RTTS + 2) * self.smoothed_rtt.max(self.interval()));
                self.elevated = Some((now, recent));
            }
            return;
        }
        let proof = DRAIN_PROOF_RTTS * self.smoothed_rtt.max(self.interval());
        let (since, lowest) = self.elevated.get_or_insert((now, recent));
        *lowest = (*lowest).min(recent);
        let (since, lowest) = (*since, *lowest);
        if now.saturating_duration_since(since) >= proof {
            self.min_rtt = Some(lowest);
            self.min_rtt_at = now;
            self.next_min_rtt = None;
            self.elevated = None;
            // The losses that made the tunnel drain were measured against the old minimum.
            self.congested_until = None;
            self.recover_from = None;
            self.probing = false;
            self.path_longer += 1;
            // A new path: ramp on it as on a fresh connection, from the current window.
            self.startup.restart(self.window);
        }
    }

    /// Packets sent at `sent` were declared lost at `now`; `persistent` is quinn's persistent
    /// congestion (everything lost over several probe timeouts).
    pub fn on_loss(&mut self, now: Instant, persistent: bool) {
        if persistent {
            self.bw = [0; BW_INTERVALS];
            self.congested_until = None;
            self.recover_from = None;
            self.congestion_events += 1;
            self.window = self.min_window();
            self.startup.restart(self.window);
            return;
        }
        let queueing = match (self.min_rtt, self.latest_min_rtt()) {
            (Some(min), Some(recent)) => recent > min + QUEUE_DELAY_THRESHOLD,
            _ => false,
        };
        if queueing {
            self.startup.end();
            if !self.congested(now) {
                self.congestion_events += 1;
            }
            self.congested_until =
                Some(now + CONGESTED_HOLD_RTTS * self.smoothed_rtt.max(self.interval()));
            self.recover_from = self.congested_until;
        }
        self.update_window(now);
    }

    /// The smallest RTT sample of the latest complete interval, or of the current one.
    fn latest_min_rtt(&self) -> Option<Duration> {
        match (self.recent_min_rtt, self.interval_min_rtt) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The path MTU changed.
    pub fn on_mtu(&mut self, now: Instant, mtu: u16) {
        self.mtu = u64::from(mtu);
        self.update_window(now);
    }

    /// The gain at `now` outside the congested state: back to [`GAIN`] over [`RECOVERY_RTTS`]
    /// after a congested state that a congestion loss began, and whether it is still climbing.
    fn recovery_gain(&self, now: Instant) -> (f64, bool) {
        let Some(from) = self.recover_from.filter(|&f| now >= f) else {
            return (GAIN, false);
        };
        let span = RECOVERY_RTTS * self.smoothed_rtt.max(self.interval());
        let f = now.duration_since(from).as_secs_f64() / span.as_secs_f64();
        if f >= 1.0 {
            (GAIN, false)
        } else {
            (CONGESTED_GAIN + (GAIN - CONGESTED_GAIN) * f, true)
        }
    }

    fn update_window(&mut self, now: Instant) {
        self.congested_at_update = self.congested(now);
        let (gain, recovering) = if self.congested_at_update {
            (CONGESTED_GAIN, true)
        } else {
            self.recovery_gain(now)
        };
        let min = self.min_rtt.unwrap_or_default();
        // The RTT the window covers: near the minimum while congested (below) and while the
        // gain climbs back; otherwise the smoothed RTT, at most 3 × the minimum + 10 ms. The
        // smoothed RTT keeps the window from collapsing when the path gets longer (a relay path
        // after a direct LAN path) while the minimum still remembers the shorter one; the cap
        // keeps a flood from growing its own queue without bound when nothing drops.
        let rtt = if self.congested_at_update {
            // While congested: the smoothed RTT less the allowance, at least the minimum. A
            // queue that stands beyond the tunnel's own allowance is another flow's (BBR keeps
            // one); on the minimum alone, the window sent less than the estimate each round trip
            // beside it, which lowered the estimate, and so on down to the minimum window. At
            // most so much that the tunnel's own queue (what the window covers beyond the
            // minimum) stays within the congestion threshold and an eighth of the minimum
            // (within the allowance, as before, on paths under 8 ms): inside the elevation
            // margin, where it never reads as a longer path.
            let most = min + QUEUE_DELAY_THRESHOLD + min / 8;
            self.smoothed_rtt
                .saturating_sub(QUEUE_ALLOWANCE)
                .clamp(min, most.saturating_sub(QUEUE_ALLOWANCE).max(min))
        } else if recovering {
            min
        } else {
            self.smoothed_rtt.clamp(min, min * 3 + RTT_CAP_SLACK)
        };
        let bdp = self.bandwidth() as f64 * (rtt + QUEUE_ALLOWANCE).as_secs_f64();
        let mut w = (gain * bdp) as u64;
        // Startup ends wherever the congested state begins (a loss while queueing, the drain
        // that an elevated RTT starts, which first ends startup at the same interval's end).
        debug_assert!(!(self.startup.on && self.congested(now)));
        if self.startup.on {
            w = w.max(self.startup.window);
        }
        self.window = w.clamp(self.min_window(), MAX_WINDOW.max(self.min_window()));
    }
}

/// Counts the changes of the path under one inner connection that leave packets stranded on
/// the old path: its relay channel re-pointed at another channel (a relay restart or a
/// failover) and a direct path that failed back to the relay. The path-multiplexing socket
/// counts ([`crate::mux::MuxSocket::path_changes`]); the connection's [`Carriage`] reads it.
#[derive(Debug, Clone, Default)]
pub struct PathChanges(Arc<AtomicU64>);

impl PathChanges {
    /// One more change.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// quinn's side of [`Estimator`].
///
/// **After a path change** ([`PathChanges`]) the packets in flight on the old path are gone,
/// but quinn counts them as in flight until a loss probe's ACK declares them lost, and its
/// probe timer has backed off exponentially meanwhile (about 840 ms after 0.8 s of silence at
/// LAN RTT): with the window full of them, nothing new is sent until then. So from a change
/// until the first ACK of a packet sent after it, the window is doubled: the stranded packets
/// take at most one window, new ones get the other, and their ACKs declare the old ones lost.
#[derive(Debug, Clone)]
pub struct Carriage {
    est: Estimator,
    initial: u64,
    changes: Option<PathChanges>,
    boost: Boost,
}

/// When the window is doubled after a path change (pure).
#[derive(Debug, Clone, Default)]
struct Boost {
    /// The change count last acted on.
    seen: u64,
    /// Since when (until a packet sent after it is acknowledged).
    from: Option<Instant>,
}

impl Boost {
    fn active(&self, changes: u64) -> bool {
        self.from.is_some() || changes != self.seen
    }

    fn on_ack(&mut self, changes: u64, now: Instant, sent: Instant) {
        if changes != self.seen {
            self.seen = changes;
            self.from = Some(now);
        } else if self.from.is_some_and(|from| sent >= from) {
            self.from = None;
        }
    }
}

impl Controller for Carriage {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        if let Some(c) = &self.changes {
            self.boost.on_ack(c.get(), now, sent);
        }
        self.est.on_ack(now, sent, bytes, rtt.get(), app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        self.est.on_loss(now, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        let now = self.est.interval_start;
        self.est.on_mtu(now, new_mtu);
    }

    fn window(&self) -> u64 {
        if self
            .changes
            .as_ref()
            .is_some_and(|c| self.boost.active(c.get()))
        {
            self.est.window().saturating_mul(2)
        } else {
            self.est.window()
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.est.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// What `ztna-agent status` shows of one connection's packet carriage: quinn's path counters
/// and this controller's state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CarriageStatus {
    /// The controller's window, bytes.
    pub window_bytes: u64,
    /// Its delivery-rate estimate, Mbit/s.
    pub bandwidth_mbit: f64,
    /// Its windowed minimum RTT.
    pub min_rtt_ms: Option<f64>,
    /// Packets sent and declared lost on the connection so far.
    pub sent_packets: u64,
    pub lost_packets: u64,
    /// Losses the controller counted as congestion (the path was queueing when they happened);
    /// every other loss left the window alone.
    pub congestion_events: u64,
    /// Times the minimum RTT was raised because the path got longer.
    pub path_longer: u64,
    /// Drains started because the RTT went beyond what the window covers.
    #[serde(default)]
    pub drain_probes: u64,
}

impl CarriageStatus {
    /// The status of `conn`'s carriage (its controller is a [`Carriage`] on every ztna
    /// connection; the controller fields are zero otherwise).
    pub fn of(conn: &quinn::Connection) -> Self {
        let path = conn.stats().path;
        let mut s = Self {
            window_bytes: path.cwnd,
            bandwidth_mbit: 0.0,
            min_rtt_ms: None,
            sent_packets: path.sent_packets,
            lost_packets: path.lost_packets,
            congestion_events: 0,
            path_longer: 0,
            drain_probes: 0,
        };
        if let Ok(c) = conn.congestion_state().into_any().downcast::<Carriage>() {
            s.bandwidth_mbit = c.est.bandwidth() as f64 * 8.0 / 1e6;
            s.min_rtt_ms = c.est.min_rtt().map(|r| r.as_secs_f64() * 1000.0);
            s.congestion_events = c.est.congestion_events();
            s.path_longer = c.est.path_longer();
            s.drain_probes = c.est.drain_probes();
        }
        s
    }
}

/// [`Estimator::stream_window`] of `conn`'s controller, if it is a [`Carriage`] (it is on every
/// ztna connection). Clones the controller: for a caller that asks every few milliseconds, not
/// per packet.
pub fn stream_window(conn: &quinn::Connection) -> Option<u64> {
    let c = conn
        .congestion_state()
        .into_any()
        .downcast::<Carriage>()
        .ok()?;
    Some(c.est.stream_window())
}

/// Builds a [`Carriage`] controller per connection; with [`PathChanges`] (one factory per
/// inner connection) it opens up after a path change.
#[derive(Debug, Clone, Default)]
pub struct CarriageFactory {
    /// The path changes of the one connection this factory is for.
    pub changes: Option<PathChanges>,
}

impl ControllerFactory for CarriageFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let est = Estimator::new(now, current_mtu);
        let seen = self.changes.as_ref().map_or(0, PathChanges::get);
        Box::new(Carriage {
            initial: est.window(),
            est,
            changes: self.changes.clone(),
            boost: Boost { seen, from: None },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a path change the window stays doubled until a packet sent after the change is
    /// acknowledged; ACKs of older packets (delivered on the old path) do not end it.
    #[test]
    fn a_path_change_doubles_the_window_until_new_packets_are_acknowledged() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let changes = PathChanges::default();
        let mut b = Boost::default();
        assert!(!b.active(changes.get()));
        b.on_ack(changes.get(), ms(1), ms(0));
        assert!(!b.active(changes.get()));
        changes.bump();
        assert!(
            b.active(changes.get()),
            "active from the change on, before any ACK"
        );
        b.on_ack(changes.get(), ms(900), ms(10));
        assert!(b.active(changes.get()));
        b.on_ack(changes.get(), ms(905), ms(899));
        assert!(b.active(changes.get()), "an ACK of a packet from before");
        b.on_ack(changes.get(), ms(910), ms(901));
        assert!(!b.active(changes.get()));
        // Two changes in a row: the latest counts.
        changes.bump();
        changes.bump();
        b.on_ack(changes.get(), ms(2000), ms(1990));
        assert!(b.active(changes.get()));
        b.on_ack(changes.get(), ms(2010), ms(2001));
        assert!(!b.active(changes.get()));
    }

    const MTU: u16 = 1400;

    /// A simulated path: a bottleneck of `rate` bytes/s with a FIFO of at most `queue` bytes,
    /// `rtt` of propagation, random loss of 1 in `loss_every` packets (0: none), and a sender
    /// that always has data (a flood) and sends whatever the window and pacing allow.
    struct Sim {
        rate: f64,
        rtt: Duration,
        queue: u64,
        loss_every: u64,
        /// From this time on (since the start), the propagation RTT is the second value.
        rtt_change: Option<(Duration, Duration)>,
        /// A reliable stream's sender, as quinn sends one: lost packets are sent again (ahead
        /// of new data), and the bytes from the oldest one not yet acknowledged to the newest
        /// sent are bounded by [`Estimator::stream_window`] (quinn's send window, which counts
        /// the bytes acknowledged beyond a hole until it is filled); a sender held back by it
        /// is app-limited.
        stream: bool,
        /// Another flow through the same bottleneck, from the start.
        rival: Option<RivalKind>,
    }

    /// The flow that competes with the tunnel at the bottleneck, as a user's TCP outside the
    /// tunnel would (the bench's shared-bottleneck test): it always has data and loses only
    /// what the bottleneck's queue drops.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum RivalKind {
        /// BBR (v1, as Linux's): paces at its max-filtered delivery rate with the gain cycle
        /// 1.25, 0.75, 1 × 6 (one minimum RTT each), in flight at most 2 × its estimated
        /// bandwidth-delay product, no response to loss. Startup at 2.89 until the rate
        /// stops growing by a quarter for 3 rounds, then a drain round.
        Bbr,
        /// A loss-based TCP: slow start, then one packet per RTT, × 0.7 on a loss (at most
        /// once per RTT), like CUBIC on a short path (CUBIC's window curve aside).
        Reno,
    }

    /// The state of a [`RivalKind`] flow.
    struct Rival {
        kind: RivalKind,
        /// In flight, in send order: (sent, when its ack or loss is seen, lost, bytes,
        /// delivered bytes when sent, when those were delivered).
        in_flight: std::collections::VecDeque<(Instant, Instant, bool, u64, u64, Instant)>,
        in_flight_bytes: u64,
        delivered: u64,
        delivered_at: Instant,
        delivered_half: u64,
        tokens: f64,
        srtt: Duration,
        min_rtt: Duration,
        /// BBR: delivery-rate samples (bytes/s), the last 10 rounds' worth.
        bw: std::collections::VecDeque<(Instant, f64)>,
        startup: bool,
        full_bw: f64,
        full_rounds: u32,
        round_end: Instant,
        drain_until: Option<Instant>,
        cycle_at: Instant,
        phase: usize,
        /// Reno: window and slow-start threshold (bytes), end of the current recovery.
        cwnd: f64,
        ssthresh: f64,
        recovery_until: Instant,
    }

    impl Rival {
        /// The rival's packets are the tunnel's size.
        const PKT: u64 = MTU as u64;

        fn new(kind: RivalKind, now: Instant, rtt: Duration) -> Self {
            Self {
                kind,
                in_flight: Default::default(),
                in_flight_bytes: 0,
                delivered: 0,
                delivered_at: now,
                delivered_half: 0,
                tokens: 0.0,
                srtt: rtt,
                min_rtt: Duration::from_secs(10),
                bw: Default::default(),
                startup: true,
                full_bw: 0.0,
                full_rounds: 0,
                round_end: now + rtt,
                drain_until: None,
                cycle_at: now,
                phase: 0,
                cwnd: (10 * Self::PKT) as f64,
                ssthresh: f64::MAX,
                recovery_until: now,
            }
        }

        fn bandwidth(&self) -> f64 {
            self.bw.iter().map(|&(_, b)| b).fold(0.0, f64::max)
        }

        /// Bytes it may have in flight, and its pacing rate in bytes/s.
        fn limits(&self, now: Instant) -> (f64, f64) {
            match self.kind {
                RivalKind::Reno => (self.cwnd, 2.0 * self.cwnd / self.srtt.as_secs_f64()),
                RivalKind::Bbr => {
                    let bw = self.bandwidth();
                    if bw == 0.0 {
                        let w = (10 * Self::PKT) as f64;
                        return (w, 2.89 * w / self.srtt.as_secs_f64());
                    }
                    let bdp = bw * self.min_rtt.as_secs_f64();
                    let (pace, cwnd) = if self.startup {
                        (2.89, 2.89)
                    } else if self.drain_until.is_some_and(|d| now < d) {
                        (1.0 / 2.89, 2.0)
                    } else {
                        ([1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0][self.phase], 2.0)
                    };
                    ((cwnd * bdp).max((4 * Self::PKT) as f64), pace * bw)
                }
            }
        }

        /// Takes the acks and losses due at `now`.
        fn on_acks(&mut self, now: Instant, half: Instant) {
            while let Some(&(sent, fire, lost, bytes, delivered, delivered_at)) =
                self.in_flight.front()
            {
                if fire > now {
                    break;
                }
                self.in_flight.pop_front();
                self.in_flight_bytes -= bytes;
                if lost {
                    if self.kind == RivalKind::Reno && now >= self.recovery_until {
                        self.cwnd = (self.cwnd * 0.7).max((2 * Self::PKT) as f64);
                        self.ssthresh = self.cwnd;
                        self.recovery_until = now + self.srtt;
                    }
                    continue;
                }
                let sample = now - sent;
                self.srtt = (self.srtt * 7 + sample) / 8;
                self.min_rtt = self.min_rtt.min(sample);
                self.delivered += bytes;
                self.delivered_at = now;
                if now >= half {
                    self.delivered_half += bytes;
                }
                match self.kind {
                    RivalKind::Reno => {
                        let pkt = Self::PKT as f64;
                        if self.cwnd < self.ssthresh {
                            self.cwnd += bytes as f64;
                        } else {
                            self.cwnd += pkt * bytes as f64 / self.cwnd;
                        }
                    }
                    RivalKind::Bbr => {
                        let span = (now - delivered_at).max(sample);
                        let rate = (self.delivered - delivered) as f64 / span.as_secs_f64();
                        self.bw.push_back((now, rate));
                        let keep = 10 * self.min_rtt;
                        while self.bw.front().is_some_and(|&(t, _)| now - t > keep) {
                            self.bw.pop_front();
                        }
                    }
                }
            }
            if self.kind == RivalKind::Bbr {
                if now >= self.round_end {
                    self.round_end = now + self.srtt;
                    let bw = self.bandwidth();
                    if self.startup {
                        if bw >= self.full_bw * 1.25 {
                            self.full_bw = bw;
                            self.full_rounds = 0;
                        } else {
                            self.full_rounds += 1;
                            if self.full_rounds >= 3 {
                                self.startup = false;
                                self.drain_until = Some(now + self.srtt);
                                self.cycle_at = now + self.srtt;
                            }
                        }
                    }
                }
                if !self.startup && now >= self.cycle_at + self.min_rtt {
                    self.cycle_at = now;
                    self.phase = (self.phase + 1) % 8;
                }
            }
        }

        /// Sends what its window and pacing allow at `now` into the bottleneck.
        fn send(&mut self, now: Instant, step: Duration, link: &mut Link) {
            let (cwnd, pace) = self.limits(now);
            let pkt = Self::PKT;
            self.tokens = (self.tokens + pace * step.as_secs_f64()).min((10 * pkt) as f64);
            while self.tokens >= pkt as f64 && (self.in_flight_bytes + pkt) as f64 <= cwnd {
                self.tokens -= pkt as f64;
                let (fire, lost) = link.enqueue(now, pkt);
                self.in_flight
                    .push_back((now, fire, lost, pkt, self.delivered, self.delivered_at));
                self.in_flight_bytes += pkt;
            }
        }
    }

    /// The bottleneck: a FIFO of at most `queue` bytes in front of a link of `rate` bytes/s,
    /// then `rtt` of propagation.
    struct Link {
        rate: f64,
        queue: u64,
        rtt: Duration,
        free: Instant,
    }

    impl Link {
        /// The bytes queued in front of the link at `now`.
        fn queued(&self, now: Instant) -> u64 {
            (self.free.saturating_duration_since(now).as_secs_f64() * self.rate) as u64
        }

        /// A packet of `bytes` arrives at `now`: when its ack (or the loss seen in its
        /// place) comes back, and whether the queue dropped it.
        fn enqueue(&mut self, now: Instant, bytes: u64) -> (Instant, bool) {
            let overflow = self.queued(now) + bytes > self.queue;
            if !overflow {
                self.free = self.free.max(now) + Duration::from_secs_f64(bytes as f64 / self.rate);
            }
            (self.free.max(now) + self.rtt, overflow)
        }
    }

    struct Outcome {
        /// Bytes delivered per second over the second half.
        delivered_rate: f64,
        /// Bytes the rival flow delivered per second over the second half.
        rival_rate: f64,
        /// Bytes sent per second over the second half.
        sent_rate: f64,
        /// Largest bottleneck queue over the second half, bytes.
        max_queue: u64,
        /// When the delivery rate over one RTT first reached 90 % of the bottleneck's.
        full_at: Option<Duration>,
        /// Largest stream window over the second half, bytes.
        max_stream_window: u64,
        est: Estimator,
    }

    impl Sim {
        /// The bench's bottleneck profile: 50 Mbit/s, 20 ms, a 64 KiB (10 ms) queue, no random
        /// loss, a flood alone.
        fn bench_bottleneck() -> Self {
            Sim {
                rate: 50.0 * MBIT,
                rtt: Duration::from_millis(20),
                queue: 64 << 10,
                loss_every: 0,
                rtt_change: None,
                stream: false,
                rival: None,
            }
        }

        fn run(&self, secs: u64) -> Outcome {
            let t0 = Instant::now();
            let mut est = Estimator::new(t0, MTU);
            let pkt = u64::from(MTU);
            let step = Duration::from_micros(100);
            let end = t0 + Duration::from_secs(secs);
            let half = t0 + Duration::from_secs(secs / 2);
            // In flight, in send order: (sent, when its ack or loss is seen, lost, bytes). A
            // loss is seen when an ack for the packet would have been (quinn detects it from
            // the acks of the packets after it). The bottleneck is modelled by the time it
            // frees up; the queue is the backlog in front of it.
            // Each with its stream packet number (a retransmission keeps it).
            let mut in_flight: std::collections::VecDeque<(Instant, Instant, bool, u64, u64)> =
                Default::default();
            // The stream: packets not yet acknowledged, lost ones to send again, the next new.
            let mut unacked = std::collections::BTreeSet::new();
            let mut resend = std::collections::VecDeque::new();
            let mut next_id = 0u64;
            let mut in_flight_bytes = 0u64;
            let mut link = Link {
                rate: self.rate,
                queue: self.queue,
                rtt: self.rtt,
                free: t0,
            };
            let mut rival = self.rival.map(|kind| Rival::new(kind, t0, self.rtt));
            let mut tokens = 0.0f64;
            let mut srtt = self.rtt;
            let (mut sent_half, mut delivered_half, mut max_queue) = (0u64, 0u64, 0u64);
            let mut seq = 0u64;
            let mut now = t0;
            let mut full_at = None;
            let mut recent: std::collections::VecDeque<(Instant, u64)> = Default::default();
            let mut recent_bytes = 0u64;
            let mut app_limited = false;
            let mut max_stream_window = 0u64;
            while now < end {
                while let Some(&(sent, fire, lost, bytes, id)) = in_flight.front() {
                    if fire > now {
                        break;
                    }
                    in_flight.pop_front();
                    in_flight_bytes -= bytes;
                    if lost {
                        est.on_loss(now, false);
                        if self.stream {
                            resend.push_back(id);
                        }
                    } else {
                        unacked.remove(&id);
                        let sample = now - sent;
                        srtt = (srtt * 7 + sample) / 8;
                        est.on_ack(now, sent, bytes, srtt, app_limited);
                        recent.push_back((now, bytes));
                        recent_bytes += bytes;
                        while recent.front().is_some_and(|&(t, _)| now - t > self.rtt) {
                            recent_bytes -= recent.pop_front().map_or(0, |(_, b)| b);
                        }
                        if full_at.is_none()
                            && recent_bytes as f64 >= 0.9 * self.rate * self.rtt.as_secs_f64()
                        {
                            full_at = Some(now - t0);
                        }
                        if now >= half {
                            delivered_half += bytes;
                        }
                    }
                }
                // Pacing as quinn does: 1.25 × window per smoothed RTT.
                tokens += est.window() as f64 * 1.25 * step.as_secs_f64() / srtt.as_secs_f64();
                tokens = tokens.min((10 * pkt) as f64);
                if self.stream && now >= half {
                    max_stream_window = max_stream_window.max(est.stream_window());
                }
                // Whether the stream lets a new packet go: its bytes from the oldest one not
                // yet acknowledged, with it, within the send window.
                let stream_room = |unacked: &std::collections::BTreeSet<u64>, next_id: u64| {
                    let oldest = unacked.first().copied().unwrap_or(next_id);
                    (next_id + 1 - oldest) * pkt <= est.stream_window()
                };
                if self.stream {
                    app_limited = resend.is_empty()
                        && !stream_room(&unacked, next_id)
                        && in_flight_bytes + pkt <= est.window();
                }
                while tokens >= pkt as f64 && in_flight_bytes + pkt <= est.window() {
                    let id = if !self.stream {
                        0
                    } else if let Some(id) = resend.pop_front() {
                        id
                    } else if stream_room(&unacked, next_id) {
                        unacked.insert(next_id);
                        next_id += 1;
                        next_id - 1
                    } else {
                        break;
                    };
                    tokens -= pkt as f64;
                    seq += 1;
                    if now >= half {
                        max_queue = max_queue.max(link.queued(now));
                        sent_half += pkt;
                    }
                    let random_loss = self.loss_every > 0 && seq.is_multiple_of(self.loss_every);
                    link.rtt = match self.rtt_change {
                        Some((at, rtt)) if now - t0 >= at => rtt,
                        _ => self.rtt,
                    };
                    let (fire, overflow) = link.enqueue(now, pkt);
                    in_flight.push_back((now, fire, overflow || random_loss, pkt, id));
                    in_flight_bytes += pkt;
                }
                if let Some(r) = &mut rival {
                    r.on_acks(now, half);
                    r.send(now, step, &mut link);
                }
                now += step;
            }
            let half_secs = (secs - secs / 2) as f64;
            Outcome {
                rival_rate: rival.map_or(0.0, |r| r.delivered_half as f64 / half_secs),
                delivered_rate: delivered_half as f64 / half_secs,
                sent_rate: sent_half as f64 / half_secs,
                max_queue,
                full_at,
                max_stream_window,
                est,
            }
        }
    }

    const MBIT: f64 = 1_000_000.0 / 8.0;

    /// The bench's shared bottleneck (50 Mbit/s, 64 KiB queue, 20 ms) and the eight around it
    /// (queues of 48, 64 and 80 KiB, RTTs of 18, 20 and 22 ms): the tunnel's share against a
    /// BBR flow and a loss-based one, for a flood (an upload's datagrams) and for the carriage
    /// stream (a download).
    ///
    /// A grid and not the bench's point alone: the shares against BBR jump between neighbouring
    /// points (with the window on the minimum RTT in the congested state, the stream kept 0.35
    /// at the bench's point and 0.13–0.15 at six of the eight around it), so one point says
    /// little about a change. Covering another flow's standing queue in the congested state
    /// raised the bench's point to 0.58 but the grid's mean from 0.21 to 0.32; in the bench the
    /// BBR download's share moved less still (docs/architecture.md, "Sharing a bottleneck").
    #[test]
    fn shares_a_bottleneck_with_another_flow() {
        for rival in [RivalKind::Bbr, RivalKind::Reno] {
            for stream in [false, true] {
                let what = if stream { "stream" } else { "flood" };
                let mut shares = Vec::new();
                for queue_kib in [48u64, 64, 80] {
                    for rtt_ms in [18u64, 20, 22] {
                        let out = Sim {
                            stream,
                            rival: Some(rival),
                            queue: queue_kib << 10,
                            rtt: Duration::from_millis(rtt_ms),
                            ..Sim::bench_bottleneck()
                        }
                        .run(20);
                        let (ours, theirs) = (out.delivered_rate, out.rival_rate);
                        let share = ours / (ours + theirs);
                        // Neither flow starves anywhere.
                        assert!(
                            (0.1..=0.97).contains(&share),
                            "against {rival:?}, {queue_kib} KiB, {rtt_ms} ms: the {what} kept \
                             {share:.2} of the bottleneck"
                        );
                        shares.push(share);
                    }
                }
                let mean = shares.iter().sum::<f64>() / shares.len() as f64;
                let each: Vec<String> = shares.iter().map(|s| format!("{s:.2}")).collect();
                eprintln!(
                    "against {rival:?}, {what}: mean share {mean:.2} [{}]",
                    each.join(" ")
                );
                match (rival, stream) {
                    // 0.21 when the window and the stream's window covered the minimum RTT in
                    // the congested state, 0.16 before that with the stream's window capped at
                    // 1.5 windows (`Estimator::stream_window`).
                    (RivalKind::Bbr, true) => assert!(mean >= 0.3, "{mean:.2}"),
                    // The tunnel ignores loss that the loss-based flow backs off from, so it
                    // takes more than half, but not all (0.86 and 0.86 on the minimum RTT; 0.93
                    // and 0.90 now: the price of the share against BBR).
                    (RivalKind::Reno, _) => assert!(mean <= 0.95, "{mean:.2}"),
                    (RivalKind::Bbr, false) => {}
                }
            }
        }
    }

    /// `n` round trips of `rtt` from `now`, each acknowledging `bytes` sent one RTT before;
    /// returns the time after the last.
    fn round_trips(
        e: &mut Estimator,
        mut now: Instant,
        n: usize,
        rtt: Duration,
        bytes: u64,
        app_limited: bool,
    ) -> Instant {
        for _ in 0..n {
            let sent = now;
            now += rtt;
            e.on_ack(now, sent, bytes, rtt, app_limited);
        }
        now
    }

    #[test]
    fn starts_at_the_minimum_window_and_grows_with_the_delivery_rate() {
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        assert_eq!(e.window(), MIN_WINDOW_PACKETS * u64::from(MTU));
        // 10 ms RTT, 1 MB acknowledged every 10 ms: 100 MB/s.
        let mut now = t0;
        for _ in 0..20 {
            let sent = now;
            now += Duration::from_millis(10);
            e.on_ack(now, sent, 1_000_000, Duration::from_millis(10), false);
        }
        assert_eq!(e.min_rtt(), Some(Duration::from_millis(10)));
        let bw = e.bandwidth();
        assert!((95_000_000..=105_000_000).contains(&bw), "{bw}");
        // 2.5 × 100 MB/s × 15 ms = 3.75 MB.
        let w = e.window();
        assert!((3_500_000..=4_000_000).contains(&w), "{w}");
        // The path gets longer (40 ms) while the minimum still says 10 ms: the window follows
        // the smoothed RTT up to 3 × 10 + 10 ms, instead of starving the longer path.
        let sent = now;
        now += Duration::from_millis(40);
        e.on_ack(now, sent, 4_000_000, Duration::from_millis(40), false);
        let w = e.window();
        assert!(w >= 2 * 100_000_000 * 45 / 1000, "{w}");
    }

    #[test]
    fn random_loss_at_the_minimum_rtt_does_not_shrink_the_window() {
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        let mut now = t0;
        for i in 0..200 {
            let sent = now;
            now += Duration::from_millis(10);
            e.on_ack(now, sent, 500_000, Duration::from_millis(10), false);
            let before = e.window();
            if i % 3 == 0 {
                e.on_loss(now, false);
            }
            assert_eq!(e.window(), before);
        }
        assert_eq!(e.congestion_events(), 0);
    }

    #[test]
    fn loss_while_queueing_is_congestion_for_a_few_rtts() {
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        let mut now = t0;
        for _ in 0..20 {
            let sent = now;
            now += Duration::from_millis(10);
            e.on_ack(now, sent, 500_000, Duration::from_millis(10), false);
        }
        let normal = e.window();
        // Now every sample is 20 ms: a 10 ms queue.
        for _ in 0..3 {
            let sent = now;
            now += Duration::from_millis(20);
            e.on_ack(
                now,
                sent - Duration::from_millis(0),
                1_000_000,
                Duration::from_millis(20),
                false,
            );
        }
        let queued = e.window();
        e.on_loss(now, false);
        assert!(e.congested(now));
        assert_eq!(e.congestion_events(), 1);
        assert!(
            e.window() * 2 < queued.max(normal),
            "{} vs {queued}",
            e.window()
        );
        // A second loss in the same episode is the same event.
        e.on_loss(now + Duration::from_millis(1), false);
        assert_eq!(e.congestion_events(), 1);
        // Still congested after two smoothed RTTs; the gain climbs back after four, and is
        // back four later.
        // One byte acknowledged 10 ms after it left, at each of these times.
        let rtt = Duration::from_millis(10);
        let soon = round_trips(&mut e, now + Duration::from_millis(30), 1, rtt, 1, false);
        assert!(e.congested(soon));
        let later = round_trips(&mut e, now + Duration::from_millis(75), 1, rtt, 1, false);
        assert!(!e.congested(later));
        let climbing = e.window();
        assert!(climbing < queued / 2, "{climbing} vs {queued}");
        round_trips(&mut e, later + Duration::from_millis(35), 1, rtt, 1, false);
        assert!(e.window() > queued / 2);
    }

    #[test]
    fn persistent_congestion_resets_to_the_minimum_window() {
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        let mut now = t0;
        for _ in 0..20 {
            let sent = now;
            now += Duration::from_millis(10);
            e.on_ack(now, sent, 1_000_000, Duration::from_millis(10), false);
        }
        assert!(e.window() > 1_000_000);
        e.on_loss(now, true);
        assert_eq!(e.window(), MIN_WINDOW_PACKETS * u64::from(MTU));
        assert_eq!(e.bandwidth(), 0);
    }

    #[test]
    fn the_minimum_rtt_expires_so_a_longer_path_is_followed() {
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        e.on_ack(
            t0 + Duration::from_millis(1),
            t0,
            1000,
            Duration::from_millis(1),
            false,
        );
        let mut now = t0 + Duration::from_millis(1);
        while now < t0 + MIN_RTT_WINDOW + Duration::from_secs(1) {
            let sent = now;
            now += Duration::from_millis(40);
            e.on_ack(now, sent, 1000, Duration::from_millis(40), false);
        }
        assert_eq!(e.min_rtt(), Some(Duration::from_millis(40)));
    }

    #[test]
    fn a_longer_path_is_followed_within_one_minimum_rtt_window() {
        // 20 ms for 2 s, samples a little above it for 1 s more, then a path of 60 ms: the
        // minimum must be 60 ms once it expires, 10 s after its last sample, not a sample of
        // the old path taken just after it (that took a second window, 20 s).
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        let ms = Duration::from_millis;
        let mut now = round_trips(&mut e, t0, 100, ms(20), 10_000, false);
        let last_low = now;
        for _ in 0..50 {
            let sent = now;
            now += ms(20) + Duration::from_micros(100);
            e.on_ack(now, sent, 10_000, ms(20), false);
        }
        while now < last_low + MIN_RTT_WINDOW + ms(100) {
            now = round_trips(&mut e, now, 1, ms(60), 10_000, false);
        }
        assert_eq!(e.min_rtt(), Some(ms(60)));
    }

    #[test]
    fn the_window_stays_within_its_bounds() {
        let t0 = Instant::now();
        let mut e = Estimator::new(t0, MTU);
        let mut now = t0;
        for _ in 0..50 {
            let sent = now;
            now += Duration::from_millis(200);
            e.on_ack(now, sent, u64::MAX / 4, Duration::from_millis(200), false);
        }
        assert_eq!(e.window(), MAX_WINDOW);
        e.on_mtu(now, 1200);
        assert_eq!(e.window(), MAX_WINDOW);
    }

    #[test]
    fn keeps_the_rate_of_a_lossy_path() {
        // 100 Mbit/s, 40 ms RTT, a deep queue, 3 % random loss: a loss-based controller would
        // collapse; this one delivers the path's rate less the loss.
        let out = Sim {
            rate: 100.0 * MBIT,
            rtt: Duration::from_millis(40),
            queue: 2 << 20,
            loss_every: 33,
            rtt_change: None,
            stream: false,
            rival: None,
        }
        .run(6);
        let r = out.delivered_rate / MBIT;
        assert!(r > 85.0, "delivered {r:.1} Mbit/s");
    }

    #[test]
    fn follows_a_path_that_got_longer_without_waiting_for_the_minimum_to_expire() {
        // 100 Mbit/s with 1 % random loss; at 1 s the RTT goes from 20 to 60 ms (a route
        // change). The old 20 ms minimum would make every loss look like congestion for 10 s
        // and starve the window; measured over 3-6 s, the path's rate less the loss.
        let out = Sim {
            rate: 100.0 * MBIT,
            rtt: Duration::from_millis(20),
            queue: 2 << 20,
            loss_every: 100,
            rtt_change: Some((Duration::from_secs(1), Duration::from_millis(60))),
            stream: false,
            rival: None,
        }
        .run(6);
        let r = out.delivered_rate / MBIT;
        eprintln!(
            "after 20 -> 60 ms: delivered {r:.1} Mbit/s, min RTT {:?}, raised {}x",
            out.est.min_rtt(),
            out.est.path_longer()
        );
        assert!(r > 85.0, "delivered {r:.1} Mbit/s");
        assert_eq!(out.est.path_longer(), 1);
        let min = out.est.min_rtt().unwrap();
        assert!(
            min >= Duration::from_millis(60) && min < Duration::from_millis(75),
            "{min:?}"
        );
    }

    #[test]
    fn follows_a_much_longer_path_with_no_loss() {
        // 100 Mbit/s, no loss; at 1 s the RTT goes from 1 to 150 ms (a laptop leaves the LAN
        // for a distant network). The window covers at most 3 × 1 ms + 10 ms of RTT until the
        // 1 ms minimum expires (10 s): without a drain to prove the longer path it starves at
        // its minimum, 32 packets per 150 ms (2.4 Mbit/s).
        let out = Sim {
            rate: 100.0 * MBIT,
            rtt: Duration::from_millis(1),
            queue: 2 << 20,
            loss_every: 0,
            rtt_change: Some((Duration::from_secs(1), Duration::from_millis(150))),
            stream: false,
            rival: None,
        }
        .run(6);
        let r = out.delivered_rate / MBIT;
        eprintln!(
            "after 1 -> 150 ms: delivered {r:.1} Mbit/s, min RTT {:?}, raised {}x, {} drain probes",
            out.est.min_rtt(),
            out.est.path_longer(),
            out.est.drain_probes()
        );
        assert!(r > 85.0, "delivered {r:.1} Mbit/s");
        assert_eq!(out.est.path_longer(), 1);
        // Startup ended on the LAN, started over on the longer path and ended there too.
        assert_eq!(out.est.startup_exits(), 2);
    }

    #[test]
    fn fills_a_long_fat_path_faster_than_tcp_slow_start() {
        // 100 Mbit/s: TCP's slow start from 10 packets needs about 7 round trips to fill the
        // bandwidth-delay product at 150 ms (1.9 MB); the tunnel's window must get there first,
        // or it drops the user's TCP's packets while it ramps. Growing only from the delivery
        // rate (gain 2.5 per measured interval) took 9.6 round trips (1.45 s at 150 ms).
        for rtt_ms in [20u64, 60, 150] {
            let rtt = Duration::from_millis(rtt_ms);
            let out = Sim {
                rate: 100.0 * MBIT,
                rtt,
                queue: 1 << 20,
                loss_every: 0,
                rtt_change: None,
                stream: false,
                rival: None,
            }
            .run(6);
            let full = out.full_at.expect("never reached the bottleneck's rate");
            let rtts = full.as_secs_f64() / rtt.as_secs_f64();
            eprintln!("{rtt_ms} ms: 90 % of 100 Mbit/s after {full:?} ({rtts:.1} RTTs)");
            assert!(
                rtts < 7.0,
                "{rtt_ms} ms: {rtts:.1} round trips to fill the path"
            );
            assert!(
                !out.est.in_startup(),
                "startup ended once the path was full"
            );
            assert!(out.delivered_rate / MBIT > 90.0);
        }
    }

    #[test]
    fn startup_grows_only_while_the_window_limits_the_sender() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(50);
        // A slow flow: 10 packets per RTT, never window-limited, for 100 round trips.
        let mut e = Estimator::new(t0, MTU);
        round_trips(&mut e, t0, 100, rtt, 10 * u64::from(MTU), true);
        assert_eq!(
            e.window(),
            MIN_WINDOW_PACKETS * u64::from(MTU),
            "the window a slow flow never used"
        );
        // A window-limited sender: ack-clocked growth, 2.5 × per window acknowledged (seen
        // within the first delivery-rate interval, before the rate says anything).
        let mut e = Estimator::new(t0, MTU);
        let w0 = e.window();
        let short = Duration::from_millis(2);
        e.on_ack(t0 + short, t0, w0, short, false);
        assert_eq!(e.bandwidth(), 0);
        assert_eq!(e.window(), w0 + (w0 as f64 * STARTUP_GROWTH) as u64);
        assert!(e.in_startup());
    }

    #[test]
    fn startup_ends_when_the_rate_stops_growing_or_a_loss_comes_with_a_queue() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        // A window-limited sender on a path that delivers 1 MB per RTT, whatever is sent.
        let mut e = Estimator::new(t0, MTU);
        let mut now = t0;
        let mut intervals = 0;
        while e.in_startup() {
            let sent = now;
            now += rtt;
            e.on_ack(now, sent, 1_000_000, rtt, false);
            intervals += 1;
            assert!(intervals < 10, "startup never ended");
        }
        assert_eq!(e.startup_exits(), 1);
        // 100 MB/s: the window is the delivery rate's again, not the startup window.
        let w = e.window();
        assert!((3_500_000..=4_000_000).contains(&w), "{w}");
        // A loss while the path queues ends startup at once.
        let mut e = Estimator::new(t0, MTU);
        e.on_ack(t0 + rtt, t0, 100_000, rtt, false);
        let later = t0 + 3 * rtt;
        e.on_ack(later, later - 2 * rtt, 100_000, 2 * rtt, false);
        e.on_loss(later, false);
        assert!(!e.in_startup());
        // Persistent congestion starts over.
        e.on_loss(later, true);
        assert!(e.in_startup());
        assert_eq!(e.startup_exits(), 1);
    }

    #[test]
    fn an_idle_connection_keeps_what_it_learnt_of_the_path() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut e = Estimator::new(t0, MTU);
        let mut now = round_trips(&mut e, t0, 100, rtt, 1_000_000, false);
        let (bw, w) = (e.bandwidth(), e.window());
        assert!(bw > 90_000_000, "{bw}");
        // Keepalives (app-limited, a few bytes a second) for a while: the path is the same.
        let quiet = |e: &mut Estimator, mut now: Instant, secs: u32| {
            for _ in 0..secs {
                let sent = now;
                now += Duration::from_secs(1);
                e.on_ack(now, sent + Duration::from_millis(990), 60, rtt, true);
            }
            now
        };
        now = quiet(&mut e, now, BW_KEEP.as_secs() as u32 - 2);
        assert_eq!(e.bandwidth(), bw);
        assert_eq!(e.window(), w, "the next flow starts at the path's rate");
        // A sample above the estimate counts even from an app-limited sender.
        let sent = now;
        now += rtt;
        e.on_ack(now, sent, 2_000_000, rtt, true);
        let (high, w_high) = (e.bandwidth(), e.window());
        assert!(high > bw);
        // But not for good: after BW_KEEP with nothing window-limited to confirm it, what the
        // app-limited sender measures ages it out (an overestimate must not stay).
        quiet(
            &mut e,
            now,
            BW_KEEP.as_secs() as u32 + BW_INTERVALS as u32 + 1,
        );
        assert!(e.bandwidth() < bw / 100, "{} kept", e.bandwidth());
        // The next flow ramps in startup (2.5 × per round trip) from a quarter of the window
        // the estimate had kept.
        assert!(e.in_startup());
        assert_eq!(e.window(), w_high / 4);
        assert!(e.window() < w);
    }

    #[test]
    fn a_flood_into_a_bottleneck_stays_near_its_rate_with_a_bounded_queue() {
        // 50 Mbit/s, 20 ms RTT, a 64 KiB (10 ms) queue, and a sender that always has data: the
        // tunnel must not send far more than the bottleneck carries.
        let out = Sim::bench_bottleneck().run(6);
        let (d, s) = (out.delivered_rate / MBIT, out.sent_rate / MBIT);
        eprintln!("flood into 50 Mbit/s: sent {s:.1}, delivered {d:.1} Mbit/s");
        assert!(d > 40.0, "delivered {d:.1} Mbit/s");
        // 63.8 before the gain climbed back over RECOVERY_RTTS, when it jumped back at once.
        assert!(
            s < 1.15 * 50.0,
            "sent {s:.1} Mbit/s into a 50 Mbit/s bottleneck"
        );
        assert!(out.est.congestion_events() > 0);
        assert!(out.max_queue <= 64 << 10);
        assert_eq!(
            out.est.path_longer(),
            0,
            "its own queue is not a longer path"
        );
    }

    #[test]
    fn a_reliable_stream_keeps_the_path_full_without_running_far_ahead() {
        // The TCP carriage stream through a 50 Mbit/s bottleneck (20 ms, a 64 KiB queue) and
        // through a long fat path: its send window keeps the path full while what it holds,
        // the wait of a segment written now behind those ahead of it, stays near one round trip.
        for (rate, rtt, queue) in [
            (50.0 * MBIT, 20, 64 << 10),
            (100.0 * MBIT, 150, 4 << 20),
            (1000.0 * MBIT, 1, 1 << 20),
        ] {
            let rtt = Duration::from_millis(rtt);
            let out = Sim {
                rate,
                rtt,
                queue,
                loss_every: 0,
                rtt_change: None,
                stream: true,
                rival: None,
            }
            .run(8);
            let d = out.delivered_rate / rate;
            let wait = out.max_stream_window as f64 / rate;
            eprintln!(
                "stream at {:.0} Mbit/s, {rtt:?}: delivered {d:.2} of the rate, wait behind \
                 the stream {wait:.3} s, sent {:.1} Mbit/s",
                rate / MBIT,
                out.sent_rate / MBIT
            );
            assert!(d > 0.9, "delivered {d:.2} of the rate");
            let sent = out.sent_rate / rate;
            assert!(sent < 1.1, "sent {sent:.2} × the rate into the bottleneck");
            // About two round trips with the bottleneck's queue, and the stream's lead.
            let bound = 2.0
                * (rtt.as_secs_f64() + queue as f64 / rate).min(rtt.as_secs_f64() + 0.05)
                + 0.012;
            assert!(
                wait < bound,
                "a segment waits {wait:.3} s behind the stream"
            );
        }
    }

    #[test]
    fn a_flood_into_a_deep_bottleneck_keeps_the_queue_short() {
        // A deep (1 s) queue: the window, not the queue, bounds the standing delay.
        let rate = 50.0 * MBIT;
        let out = Sim {
            rate,
            rtt: Duration::from_millis(20),
            queue: (rate as u64),
            loss_every: 0,
            rtt_change: None,
            stream: false,
            rival: None,
        }
        .run(6);
        let d = out.delivered_rate / MBIT;
        assert!(d > 45.0, "delivered {d:.1} Mbit/s");
        // GAIN × BDP(3 × 20 ms + 10 ms + 5 ms) − BDP(20 ms): at most ~170 ms of queue, far below
        // the 1 s the queue would hold.
        let queue_delay = out.max_queue as f64 / rate;
        eprintln!("flood into a deep queue: standing queue {queue_delay:.3} s");
        assert!(queue_delay < 0.2, "standing queue {queue_delay:.3} s");
        assert_eq!(
            out.est.path_longer(),
            0,
            "its own queue is not a longer path"
        );
    }
}
