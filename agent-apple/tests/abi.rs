//! ABI misuse tests: the exported functions called the way a careless (or concurrent) platform
//! would call them. Null and freed handles, double free, stop twice, start after stop, invalid
//! JSON and unknown keys, life-cycle calls from inside a callback, no callback after stop
//! returns, and calls from several threads at once. No network: the relay is a local UDP
//! socket that never answers, so the core keeps trying (and logging) the whole time.

// Test helpers panic on setup failures, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_apple::*;
use ztna_core::pki::CertificateAuthority;
use ztna_proto::Role;

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 512];
    // SAFETY: the buffer holds 512 bytes.
    let n = unsafe { ztna_last_error_message(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated by the call.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(n.min(511), s.len());
    s
}

/// A config whose relay is a silent local socket (kept open by the returned guard).
fn config(log: &str) -> (CString, UdpSocket) {
    let ca = CertificateAuthority::generate("Test Org").unwrap();
    let issued = ca
        .issue(Role::Agent, "alice", &["eng".to_owned()], &[])
        .unwrap();
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let json = serde_json::json!({
        "relay": silent.local_addr().unwrap().to_string(),
        "bind": "127.0.0.1:0",
        "ca": ca.cert_pem(), "cert": issued.cert_pem, "key": issued.key_pem,
        "log": log,
    });
    (CString::new(json.to_string()).unwrap(), silent)
}

/// What the callbacks saw.
#[derive(Default)]
struct Seen {
    calls: AtomicU64,
    after_stop: AtomicU64,
    stopped: AtomicBool,
    /// Handle for the callback that tries life-cycle calls (0: don't).
    misuse_handle: AtomicU64,
    misuse_result: AtomicI32,
}

unsafe extern "C" fn on_log(ctx: *mut c_void, _level: i32, msg: *const c_char) {
    // SAFETY: the context is the `Seen` the test keeps alive until free returns.
    let seen = unsafe { &*(ctx as *const Seen) };
    assert!(!msg.is_null());
    seen.calls.fetch_add(1, Ordering::SeqCst);
    if seen.stopped.load(Ordering::SeqCst) {
        seen.after_stop.fetch_add(1, Ordering::SeqCst);
    }
    let h = seen.misuse_handle.swap(0, Ordering::SeqCst);
    if h != 0 {
        let r = [ztna_stop(h), ztna_free(h), ztna_network_changed(h)];
        let all_refused = r.iter().all(|c| *c == ZTNA_ERR_WRONG_THREAD);
        seen.misuse_result
            .store(if all_refused { 1 } else { -1 }, Ordering::SeqCst);
    }
}

unsafe extern "C" fn on_packets(
    ctx: *mut c_void,
    _p: *const *const u8,
    _l: *const usize,
    _n: usize,
) {
    // SAFETY: as above.
    let seen = unsafe { &*(ctx as *const Seen) };
    seen.calls.fetch_add(1, Ordering::SeqCst);
}

fn callbacks(seen: &Arc<Seen>) -> ZtnaCallbacks {
    ZtnaCallbacks {
        context: Arc::as_ptr(seen) as *mut c_void,
        packets: Some(on_packets),
        settings: None,
        log: Some(on_log),
    }
}

fn create(cfg: &CString, cb: &ZtnaCallbacks) -> ZtnaHandle {
    let mut h: ZtnaHandle = 0;
    // SAFETY: valid string, table and out pointer.
    let rc = unsafe { ztna_create(cfg.as_ptr(), cb, &mut h) };
    assert_eq!(rc, ZTNA_OK, "{}", last_error());
    assert_ne!(h, 0);
    h
}

fn status(h: ZtnaHandle) -> Result<serde_json::Value, i32> {
    let mut len = 0usize;
    // SAFETY: null buffer with capacity 0 asks for the length.
    let rc = unsafe { ztna_status_json(h, std::ptr::null_mut(), 0, &mut len) };
    if rc != ZTNA_ERR_BUFFER_TOO_SMALL {
        return Err(rc);
    }
    // The status can grow between two calls (an error message appears): ask again with room.
    for _ in 0..3 {
        let mut buf = vec![0 as c_char; len + 256];
        // SAFETY: the buffer holds buf.len() bytes.
        let rc = unsafe { ztna_status_json(h, buf.as_mut_ptr(), buf.len(), &mut len) };
        if rc == ZTNA_ERR_BUFFER_TOO_SMALL {
            continue;
        }
        if rc != ZTNA_OK {
            return Err(rc);
        }
        // SAFETY: NUL-terminated by the call.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!(text.len(), len);
        return Ok(serde_json::from_str(text).unwrap());
    }
    Err(ZTNA_ERR_BUFFER_TOO_SMALL)
}

fn send(h: ZtnaHandle, packets: &[Vec<u8>]) -> i32 {
    let ptrs: Vec<*const u8> = packets.iter().map(|p| p.as_ptr()).collect();
    let lens: Vec<usize> = packets.iter().map(|p| p.len()).collect();
    // SAFETY: both arrays hold packets.len() entries, each pointing at its length.
    unsafe { ztna_send_packets(h, ptrs.as_ptr(), lens.as_ptr(), packets.len()) }
}

fn ipv4_packet(dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[3] = 28;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 2]);
    p[16..20].copy_from_slice(&dst);
    p
}

#[test]
fn null_zero_and_unknown_handles_are_errors() {
    for h in [0, u64::MAX, 987_654_321] {
        assert_eq!(ztna_start(h), ZTNA_ERR_BAD_HANDLE);
        assert!(
            last_error().contains("not a live tunnel"),
            "{}",
            last_error()
        );
        assert_eq!(ztna_stop(h), ZTNA_ERR_BAD_HANDLE);
        assert_eq!(ztna_free(h), ZTNA_ERR_BAD_HANDLE);
        assert_eq!(ztna_network_changed(h), ZTNA_ERR_BAD_HANDLE);
        assert_eq!(ztna_sleep(h), ZTNA_ERR_BAD_HANDLE);
        assert_eq!(ztna_wake(h), ZTNA_ERR_BAD_HANDLE);
        assert_eq!(
            send(h, &[ipv4_packet([10, 100, 0, 1])]),
            ZTNA_ERR_BAD_HANDLE
        );
        assert_eq!(status(h), Err(ZTNA_ERR_BAD_HANDLE));
    }
    let mut h = 0;
    // SAFETY: null pointers are what is being tested.
    unsafe {
        assert_eq!(
            ztna_create(std::ptr::null(), std::ptr::null(), &mut h),
            ZTNA_ERR_NULL
        );
        assert!(last_error().contains("config_json"));
        let (cfg, _relay) = config("info");
        assert_eq!(
            ztna_create(cfg.as_ptr(), std::ptr::null(), std::ptr::null_mut()),
            ZTNA_ERR_NULL
        );
    }
    assert_eq!(h, 0, "no handle written on failure");
    // The message can be read in pieces: a short buffer is truncated and NUL-terminated.
    let mut small = [1 as c_char; 4];
    // SAFETY: 4 writable bytes.
    let full = unsafe { ztna_last_error_message(small.as_mut_ptr(), small.len()) };
    assert!(full > 3);
    assert_eq!(small[3], 0);
    // SAFETY: the version is a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(ztna_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn invalid_configs_are_refused_with_a_message() {
    let mut h = 0;
    let (good, _relay) = config("info");
    let good: serde_json::Value = serde_json::from_str(good.to_str().unwrap()).unwrap();
    let mut unknown = good.clone();
    unknown["realy"] = "10.0.0.1:4433".into();
    let mut bad_filter = good.clone();
    bad_filter["log"] = "[[[".into();
    let mut relay_cert = good.clone();
    relay_cert["key"] =
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n".into();
    for (text, want) in [
        ("{not json".to_owned(), "parsing the JSON config"),
        ("[]".to_owned(), "parsing the JSON config"),
        (unknown.to_string(), "realy"),
        (bad_filter.to_string(), "`log`"),
        (relay_cert.to_string(), "credentials"),
        (r#"{"relay": "10.0.0.1:4433"}"#.to_owned(), "missing `ca`"),
    ] {
        let c = CString::new(text.clone()).unwrap();
        // SAFETY: valid string and out pointer; null callbacks are allowed.
        let rc = unsafe { ztna_create(c.as_ptr(), std::ptr::null(), &mut h) };
        assert_eq!(rc, ZTNA_ERR_CONFIG, "{text}");
        let msg = last_error();
        assert!(
            msg.contains(want),
            "{text}: {msg:?} should mention {want:?}"
        );
    }
    let not_utf8 = CString::new(vec![b'{', 0xff, b'}']).unwrap();
    // SAFETY: as above.
    let rc = unsafe { ztna_create(not_utf8.as_ptr(), std::ptr::null(), &mut h) };
    assert_eq!(rc, ZTNA_ERR_CONFIG);
    assert_eq!(h, 0);
}

#[test]
fn life_cycle_misuse() {
    let (cfg, _relay) = config("info");
    let seen = Arc::new(Seen::default());
    let cb = callbacks(&seen);

    // Stop before start, start after stop, double free.
    let h = create(&cfg, &cb);
    assert_eq!(ztna_stop(h), ZTNA_OK, "stop before start");
    assert_eq!(ztna_stop(h), ZTNA_OK, "stop twice");
    assert_eq!(ztna_start(h), ZTNA_ERR_STATE, "start after stop");
    assert!(last_error().contains("free it and create a new one"));
    assert_eq!(ztna_free(h), ZTNA_OK);
    assert_eq!(ztna_free(h), ZTNA_ERR_BAD_HANDLE, "double free");
    assert_eq!(ztna_start(h), ZTNA_ERR_BAD_HANDLE, "start after free");

    // A running tunnel: start twice, events, packets, status, stop twice, use after stop.
    let h2 = create(&cfg, &cb);
    assert_ne!(h2, h, "handles are never reused");
    assert_eq!(
        send(h2, &[ipv4_packet([10, 100, 0, 1])]),
        ZTNA_ERR_STATE,
        "before start"
    );
    assert_eq!(status(h2), Err(ZTNA_ERR_STATE));
    assert_eq!(ztna_network_changed(h2), ZTNA_ERR_STATE);
    assert_eq!(ztna_start(h2), ZTNA_OK, "{}", last_error());
    assert_eq!(ztna_start(h2), ZTNA_ERR_STATE, "start twice");
    assert_eq!(ztna_network_changed(h2), ZTNA_OK);
    assert_eq!(ztna_sleep(h2), ZTNA_OK);
    assert_eq!(ztna_wake(h2), ZTNA_OK);
    let batch: Vec<Vec<u8>> = (0..3).map(|i| ipv4_packet([10, 100, 0, i])).collect();
    assert_eq!(send(h2, &batch), ZTNA_OK);
    assert_eq!(
        send(h2, &[vec![0x45; 3], vec![]]),
        ZTNA_OK,
        "runt and empty packets"
    );
    let many: Vec<Vec<u8>> = (0..=ZTNA_MAX_BATCH)
        .map(|_| ipv4_packet([1, 2, 3, 4]))
        .collect();
    assert_eq!(send(h2, &many), ZTNA_ERR_INVALID_ARGUMENT);
    // SAFETY: null arrays with a non-zero count are what is being tested.
    unsafe {
        assert_eq!(
            ztna_send_packets(h2, std::ptr::null(), std::ptr::null(), 1),
            ZTNA_ERR_NULL
        );
        assert_eq!(
            ztna_send_packets(h2, std::ptr::null(), std::ptr::null(), 0),
            ZTNA_OK
        );
    }
    let st = status(h2).unwrap();
    assert_eq!(st["connected"], false, "{st}");
    assert_eq!(st["identity"], "alice");
    assert_eq!(st["mtu"], 1280);
    assert_eq!(
        st["dropped_no_route"], 5,
        "3 unrouted, 1 runt and 1 empty packet: {st}"
    );
    // The exact shape of `ztna-agent status --json`.
    let keys: Vec<&str> = st.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "relay",
        "connected",
        "identity",
        "tunnel_ip",
        "observed_addr",
        "relay_rtt_ms",
        "mtu",
        "rejected",
        "connectors",
        "dropped_no_route",
        "dropped_tunnel_down",
        "dropped_to_platform",
        "relay_sessions",
        "last_error",
    ] {
        assert!(keys.contains(&k), "status lacks {k}: {st}");
    }
    // A status buffer one byte short is refused with the needed length.
    let mut len = 0;
    let mut small = vec![0 as c_char; 8];
    // SAFETY: 8 writable bytes.
    let rc = unsafe { ztna_status_json(h2, small.as_mut_ptr(), small.len(), &mut len) };
    assert_eq!(rc, ZTNA_ERR_BUFFER_TOO_SMALL);
    assert!(len > 100);
    // SAFETY: null out_len is what is tested.
    assert_eq!(
        unsafe { ztna_status_json(h2, small.as_mut_ptr(), 8, std::ptr::null_mut()) },
        ZTNA_ERR_NULL
    );

    assert_eq!(ztna_stop(h2), ZTNA_OK);
    assert_eq!(ztna_stop(h2), ZTNA_OK, "stop twice while it ran");
    assert_eq!(ztna_start(h2), ZTNA_ERR_STATE, "start after stop");
    assert_eq!(send(h2, &batch), ZTNA_ERR_STATE, "packets after stop");
    assert_eq!(ztna_wake(h2), ZTNA_ERR_STATE, "events after stop");
    assert_eq!(ztna_free(h2), ZTNA_OK);
    assert_eq!(ztna_free(h2), ZTNA_ERR_BAD_HANDLE);
}

#[test]
fn no_callback_after_stop_returns() {
    // TRACE logging: the tunnel thread calls the log callback many times a second.
    let (cfg, _relay) = config("trace");
    let seen = Arc::new(Seen::default());
    let cb = callbacks(&seen);
    for round in 0..3 {
        seen.stopped.store(false, Ordering::SeqCst);
        let h = create(&cfg, &cb);
        assert_eq!(ztna_start(h), ZTNA_OK, "{}", last_error());
        let before = seen.calls.load(Ordering::SeqCst);
        let t0 = Instant::now();
        while seen.calls.load(Ordering::SeqCst) < before + 20
            && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            seen.calls.load(Ordering::SeqCst) >= before + 20,
            "round {round}: callbacks are not running"
        );
        // Stop in the middle of the callbacks; a free in the same state stops too (odd rounds).
        let rc = if round % 2 == 0 {
            ztna_stop(h)
        } else {
            ztna_free(h)
        };
        assert_eq!(rc, ZTNA_OK);
        seen.stopped.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            seen.after_stop.load(Ordering::SeqCst),
            0,
            "round {round}: a callback ran after stop returned"
        );
        let _ = ztna_free(h);
    }
}

#[test]
fn life_cycle_calls_from_a_callback_are_refused() {
    let (cfg, _relay) = config("debug");
    let seen = Arc::new(Seen::default());
    let h = create(&cfg, &callbacks(&seen));
    assert_eq!(ztna_start(h), ZTNA_OK);
    seen.misuse_handle.store(h, Ordering::SeqCst);
    let t0 = Instant::now();
    while seen.misuse_result.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        seen.misuse_result.load(Ordering::SeqCst),
        1,
        "stop/free/event inside a callback must give ZTNA_ERR_WRONG_THREAD"
    );
    assert_eq!(ztna_free(h), ZTNA_OK, "the tunnel still works and frees");
}

#[test]
fn calls_from_many_threads_at_once() {
    let (cfg, _relay) = config("debug");
    let seen = Arc::new(Seen::default());
    let cb = callbacks(&seen);
    for _round in 0..3 {
        let h = create(&cfg, &cb);
        assert_eq!(ztna_start(h), ZTNA_OK);
        let deadline = Instant::now() + Duration::from_millis(400);
        let workers: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    let batch: Vec<Vec<u8>> =
                        (0..16).map(|_| ipv4_packet([10, 100, 0, 9])).collect();
                    let mut calls = 0u32;
                    while Instant::now() < deadline && calls < 100_000 {
                        calls += 1;
                        let rc = match i % 4 {
                            0 | 1 => send(h, &batch),
                            2 => status(h).map(|_| ZTNA_OK).unwrap_or_else(|e| e),
                            _ => ztna_network_changed(h),
                        };
                        assert!(
                            [ZTNA_OK, ZTNA_ERR_STATE, ZTNA_ERR_BAD_HANDLE].contains(&rc),
                            "thread {i}: unexpected code {rc}: {}",
                            last_error()
                        );
                    }
                    // Everyone also tries to stop and free: exactly one free wins.
                    let _ = ztna_stop(h);
                    ztna_free(h)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150));
        let main_stop = ztna_stop(h);
        assert!([ZTNA_OK, ZTNA_ERR_BAD_HANDLE].contains(&main_stop));
        let frees: Vec<i32> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(
            frees.iter().filter(|r| **r == ZTNA_OK).count(),
            1,
            "{frees:?}"
        );
        assert!(frees
            .iter()
            .all(|r| [ZTNA_OK, ZTNA_ERR_BAD_HANDLE].contains(r)));
    }
}
