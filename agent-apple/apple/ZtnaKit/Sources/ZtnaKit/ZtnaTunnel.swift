import Foundation
import ZtnaCore

/// Log levels of the core's log callback.
public enum LogLevel: Int32 {
    case error = 1, warn, info, debug, trace
}

/// The Rust tunnel core behind one `ZtnaHandle`. Every method may be called from any thread.
/// The handlers run on the core's own thread, one at a time, and never after `stop()` returned;
/// they must not call `start`, `stop` or the event methods (the core refuses that with
/// `ZTNA_ERR_WRONG_THREAD`).
public final class ZtnaTunnel {
    public typealias PacketsHandler = (_ packets: [Data]) -> Void
    public typealias SettingsHandler = (_ settings: NetworkSettings) -> Void
    public typealias LogHandler = (_ level: LogLevel, _ line: String) -> Void

    /// What the C callbacks reach through their context pointer.
    private final class Handlers {
        let packets: PacketsHandler
        let settings: SettingsHandler
        let log: LogHandler
        init(packets: @escaping PacketsHandler, settings: @escaping SettingsHandler, log: @escaping LogHandler) {
            self.packets = packets
            self.settings = settings
            self.log = log
        }
    }

    private let handle: ZtnaHandle
    private let handlers: Unmanaged<Handlers>
    /// One contiguous buffer per outgoing batch, reused: no allocation per packet.
    private var sendBuffer = [UInt8]()
    private let sendLock = NSLock()

    public static var version: String { String(cString: ztna_version()) }

    public init(config: AgentConfig,
                packets: @escaping PacketsHandler,
                settings: @escaping SettingsHandler,
                log: @escaping LogHandler) throws {
        let json = try config.json()
        let handlers = Unmanaged.passRetained(Handlers(packets: packets, settings: settings, log: log))
        var callbacks = ZtnaCallbacks(
            context: handlers.toOpaque(),
            packets: { context, packets, lengths, count in
                guard let context, let packets, let lengths else { return }
                let handlers = Unmanaged<Handlers>.fromOpaque(context).takeUnretainedValue()
                var batch = [Data]()
                batch.reserveCapacity(count)
                for i in 0..<count {
                    if let p = packets[i] {
                        batch.append(Data(bytes: p, count: lengths[i]))
                    }
                }
                handlers.packets(batch)
            },
            settings: { context, json in
                guard let context, let json else { return }
                let handlers = Unmanaged<Handlers>.fromOpaque(context).takeUnretainedValue()
                if let settings = try? NetworkSettings.decode(String(cString: json)) {
                    handlers.settings(settings)
                } else {
                    handlers.log(.error, "undecodable network settings: \(String(cString: json))")
                }
            },
            log: { context, level, message in
                guard let context, let message else { return }
                let handlers = Unmanaged<Handlers>.fromOpaque(context).takeUnretainedValue()
                handlers.log(LogLevel(rawValue: level) ?? .info, String(cString: message))
            }
        )
        var handle: ZtnaHandle = 0
        let rc = json.withCString { ztna_create($0, &callbacks, &handle) }
        if rc != ZTNA_OK {
            let error = ZtnaError.last(rc)
            handlers.release()
            throw error
        }
        self.handle = handle
        self.handlers = handlers
    }

    deinit {
        // Stops the core if needed; no callback runs after this returns, so the handlers can go.
        _ = ztna_free(handle)
        handlers.release()
    }

    /// Binds the socket and starts connecting to the relay.
    public func start() throws {
        try ZtnaError.check(ztna_start(handle))
    }

    /// Stops the core (about a second at most) off the caller's thread.
    public func stop() async throws {
        let handle = self.handle
        try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, Error>) in
            DispatchQueue.global(qos: .userInitiated).async {
                let rc = ztna_stop(handle)
                if rc == ZTNA_OK {
                    done.resume()
                } else {
                    done.resume(throwing: ZtnaError.last(rc))
                }
            }
        }
    }

    /// Sends packets read from `packetFlow` into the tunnel, in batches of `ZTNA_MAX_BATCH`.
    public func send(_ packets: [Data]) throws {
        sendLock.lock()
        defer { sendLock.unlock() }
        let maxBatch = Int(ZTNA_MAX_BATCH)
        var start = 0
        while start < packets.count {
            let batch = packets[start..<min(start + maxBatch, packets.count)]
            sendBuffer.removeAll(keepingCapacity: true)
            var offsets = [Int]()
            var lengths = [Int]()
            offsets.reserveCapacity(batch.count)
            lengths.reserveCapacity(batch.count)
            for packet in batch {
                offsets.append(sendBuffer.count)
                lengths.append(packet.count)
                sendBuffer.append(contentsOf: packet)
            }
            let rc: Int32 = sendBuffer.withUnsafeBufferPointer { buffer in
                guard let base = buffer.baseAddress else {
                    return ztna_send_packets(handle, nil, nil, 0)
                }
                var pointers: [UnsafePointer<UInt8>?] = offsets.map { base + $0 }
                return pointers.withUnsafeMutableBufferPointer { p in
                    lengths.withUnsafeBufferPointer { l in
                        ztna_send_packets(handle, p.baseAddress, l.baseAddress, batch.count)
                    }
                }
            }
            try ZtnaError.check(rc)
            start += maxBatch
        }
    }

    /// The status snapshot.
    public func status() throws -> AgentStatus {
        var length: Int = 0
        var rc = ztna_status_json(handle, nil, 0, &length)
        if rc != ZTNA_ERR_BUFFER_TOO_SMALL {
            throw ZtnaError.last(rc)
        }
        var buffer = [CChar](repeating: 0, count: length + 1024)
        rc = ztna_status_json(handle, &buffer, buffer.count, &length)
        try ZtnaError.check(rc)
        let data = buffer.withUnsafeBufferPointer { p in
            Data(bytes: UnsafeRawPointer(p.baseAddress!), count: length)
        }
        return try AgentStatus.decode(data)
    }

    /// The raw status JSON, for handing to the app unchanged.
    public func statusJSON() throws -> Data {
        var length: Int = 0
        var rc = ztna_status_json(handle, nil, 0, &length)
        if rc != ZTNA_ERR_BUFFER_TOO_SMALL {
            throw ZtnaError.last(rc)
        }
        var buffer = [CChar](repeating: 0, count: length + 1024)
        rc = ztna_status_json(handle, &buffer, buffer.count, &length)
        try ZtnaError.check(rc)
        return buffer.withUnsafeBufferPointer { p in
            Data(bytes: UnsafeRawPointer(p.baseAddress!), count: length)
        }
    }

    /// The network path changed (`NWPathMonitor`).
    public func networkChanged() {
        _ = ztna_network_changed(handle)
    }

    /// The system goes to sleep.
    public func sleep() {
        _ = ztna_sleep(handle)
    }

    /// The system woke up.
    public func wake() {
        _ = ztna_wake(handle)
    }
}
