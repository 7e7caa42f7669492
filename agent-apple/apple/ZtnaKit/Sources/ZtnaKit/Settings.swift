import Foundation

/// One route of the settings callback: IPv4 with a `subnetMask`, IPv6 without.
public struct Route: Codable, Equatable {
    public let address: String
    public let prefix: UInt8
    public let subnetMask: String?
}

/// Split DNS: resolvers inside the tunnel and the domains they answer for.
public struct DnsSettings: Codable, Equatable {
    public let servers: [String]
    public let matchDomains: [String]
}

/// What the core asks the extension to apply with `setTunnelNetworkSettings`.
public struct NetworkSettings: Codable, Equatable {
    public let tunnelRemoteAddress: String
    public let ipv4Address: String
    /// The IPv6 tunnel address (prefix length 128); nil when the tunnel carries IPv4 only.
    public let ipv6Address: String?
    public let mtu: UInt16
    public let includedRoutes: [Route]
    public let excludedRoutes: [Route]
    public let dns: DnsSettings?

    static func decode(_ json: String) throws -> NetworkSettings {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(NetworkSettings.self, from: Data(json.utf8))
    }
}
