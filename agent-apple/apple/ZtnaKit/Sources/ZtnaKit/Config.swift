import Foundation

/// The agent's config: the same keys as the Linux agent's config file. `ca`, `cert` and `key`
/// hold PEM text (the key comes from the Keychain) or a path.
public struct AgentConfig: Codable, Equatable {
    public var relay: String
    public var relayName: String?
    public var bind: String?
    public var ca: String
    public var cert: String
    public var key: String
    public var mtu: UInt16?
    public var services: [String]?
    public var log: String?
    public var directPaths: Bool?

    public init(relay: String, relayName: String? = nil, bind: String? = nil, ca: String,
                cert: String, key: String, mtu: UInt16? = nil, services: [String]? = nil,
                log: String? = nil, directPaths: Bool? = nil) {
        self.relay = relay
        self.relayName = relayName
        self.bind = bind
        self.ca = ca
        self.cert = cert
        self.key = key
        self.mtu = mtu
        self.services = services
        self.log = log
        self.directPaths = directPaths
    }

    /// The JSON document `ztna_create` takes (snake_case keys, absent values left out).
    public func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        let data = try encoder.encode(self)
        return String(decoding: data, as: UTF8.self)
    }
}
