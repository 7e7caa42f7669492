import Foundation
import Network
import NetworkExtension
import os.log
import ZtnaKit

/// The packet tunnel: starts the Rust core, applies the settings it asks for, and pumps
/// `packetFlow` both ways. Everything else (sockets, relay, catalog, direct paths, reconnects)
/// is the core's.
final class PacketTunnelProvider: NEPacketTunnelProvider {
    private let logger = Logger(subsystem: "net.ztna.agent.tunnel", category: "core")
    private var tunnel: ZtnaTunnel?
    private let pathMonitor = NWPathMonitor()
    private let queue = DispatchQueue(label: "net.ztna.agent.tunnel")
    private var startCompletion: ((Error?) -> Void)?
    private var reading = false

    override func startTunnel(options: [String: NSObject]?, completionHandler: @escaping (Error?) -> Void) {
        do {
            let config = try SharedConfig.load(protocolConfiguration: protocolConfiguration)
            let logger = self.logger
            let tunnel = try ZtnaTunnel(
                config: config,
                packets: { [weak self] packets in
                    let protocols = packets.map { packet -> NSNumber in
                        let version = packet.first.map { $0 >> 4 } ?? 4
                        return NSNumber(value: version == 6 ? AF_INET6 : AF_INET)
                    }
                    self?.packetFlow.writePackets(packets, withProtocols: protocols)
                },
                settings: { [weak self] settings in
                    self?.queue.async { self?.apply(settings) }
                },
                log: { level, line in
                    logger.log(level: level.osLogType, "\(line, privacy: .public)")
                }
            )
            self.tunnel = tunnel
            startCompletion = completionHandler
            try tunnel.start()
            pathMonitor.pathUpdateHandler = { [weak self] _ in
                self?.tunnel?.networkChanged()
            }
            pathMonitor.start(queue: queue)
        } catch {
            logger.error("could not start the tunnel: \(String(describing: error), privacy: .public)")
            completionHandler(error)
        }
    }

    /// Applies the core's settings; the first successful one completes `startTunnel`.
    private func apply(_ s: NetworkSettings) {
        let settings = NEPacketTunnelNetworkSettings(tunnelRemoteAddress: s.tunnelRemoteAddress)
        let ipv4 = NEIPv4Settings(addresses: [s.ipv4Address], subnetMasks: ["255.255.255.255"])
        ipv4.includedRoutes = s.includedRoutes.filter { $0.subnetMask != nil }.map {
            NEIPv4Route(destinationAddress: $0.address, subnetMask: $0.subnetMask ?? "255.255.255.255")
        }
        ipv4.excludedRoutes = s.excludedRoutes.filter { $0.subnetMask != nil }.map {
            NEIPv4Route(destinationAddress: $0.address, subnetMask: $0.subnetMask ?? "255.255.255.255")
        }
        settings.ipv4Settings = ipv4
        // IPv6: the tunnel address (/128), the services' IPv6 routes, and the relay or peers
        // that have IPv6 addresses kept out of the tunnel.
        let v6Included = s.includedRoutes.filter { $0.subnetMask == nil }
        let v6Excluded = s.excludedRoutes.filter { $0.subnetMask == nil }
        if s.ipv6Address != nil || !v6Excluded.isEmpty {
            let addresses = s.ipv6Address.map { [$0] } ?? []
            let ipv6 = NEIPv6Settings(
                addresses: addresses,
                networkPrefixLengths: addresses.map { _ in NSNumber(value: 128) })
            ipv6.includedRoutes = v6Included.map {
                NEIPv6Route(destinationAddress: $0.address, networkPrefixLength: NSNumber(value: $0.prefix))
            }
            ipv6.excludedRoutes = v6Excluded.map {
                NEIPv6Route(destinationAddress: $0.address, networkPrefixLength: NSNumber(value: $0.prefix))
            }
            settings.ipv6Settings = ipv6
        }
        settings.mtu = NSNumber(value: s.mtu)
        if let dns = s.dns {
            let d = NEDNSSettings(servers: dns.servers)
            d.matchDomains = dns.matchDomains
            settings.dnsSettings = d
        }
        setTunnelNetworkSettings(settings) { [weak self] error in
            guard let self else { return }
            if let error {
                self.logger.error("applying network settings failed: \(String(describing: error), privacy: .public)")
            }
            self.queue.async {
                if let done = self.startCompletion {
                    self.startCompletion = nil
                    done(error)
                }
                if error == nil && !self.reading {
                    self.reading = true
                    self.readPackets()
                }
            }
        }
    }

    /// Reads batches from the system and hands them to the core, until the tunnel is gone.
    private func readPackets() {
        packetFlow.readPackets { [weak self] packets, _ in
            guard let self, let tunnel = self.tunnel else { return }
            do {
                try tunnel.send(packets)
            } catch {
                self.logger.debug("packets not sent: \(String(describing: error), privacy: .public)")
            }
            self.readPackets()
        }
    }

    override func stopTunnel(with reason: NEProviderStopReason, completionHandler: @escaping () -> Void) {
        pathMonitor.cancel()
        let tunnel = self.tunnel
        self.tunnel = nil
        Task {
            try? await tunnel?.stop()
            completionHandler()
        }
    }

    override func sleep(completionHandler: @escaping () -> Void) {
        tunnel?.sleep()
        completionHandler()
    }

    override func wake() {
        tunnel?.wake()
    }

    /// The app asks for the status: the core's JSON, unchanged.
    override func handleAppMessage(_ messageData: Data, completionHandler: ((Data?) -> Void)?) {
        completionHandler?(try? tunnel?.statusJSON())
    }
}

extension LogLevel {
    var osLogType: OSLogType {
        switch self {
        case .error: return .error
        case .warn: return .default
        case .info: return .info
        case .debug, .trace: return .debug
        }
    }
}
