import Foundation

/// Direct-path state of one connector.
public struct DirectStatus: Codable, Equatable {
    public let addr: String?
    public let rttMs: Double?
    public let upgrades: UInt64
    public let fallbacks: UInt64
}

/// One connector as the agent sees it.
public struct ConnectorStatus: Codable, Equatable, Identifiable {
    public var id: String { name }
    public let name: String
    /// `direct-lan`, `direct-wan`, `relay`, `connecting` or `down`.
    public let path: String
    public let rttMs: Double?
    public let txBytes: UInt64
    public let rxBytes: UInt64
    public let txPackets: UInt64
    public let rxPackets: UInt64
    public let services: [String]
    public let lastError: String?
    public let direct: DirectStatus?
}

/// The status snapshot: the shape of `ztna-agent status --json`.
public struct AgentStatus: Codable, Equatable {
    public let relay: String
    public let connected: Bool
    public let identity: String
    public let tunnelIp: String?
    /// The IPv6 tunnel address (derived from `tunnelIp`); absent from older agents.
    public let tunnelIpv6: String?
    public let observedAddr: String?
    public let relayRttMs: Double?
    public let mtu: UInt16
    public let connectors: [ConnectorStatus]
    public let droppedNoRoute: UInt64
    public let droppedTunnelDown: UInt64
    public let droppedToPlatform: UInt64
    public let relaySessions: UInt64
    public let lastError: String?

    public static func decode(_ data: Data) throws -> AgentStatus {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(AgentStatus.self, from: data)
    }
}
