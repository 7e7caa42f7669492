import Foundation
import NetworkExtension
import Security
import ZtnaKit

/// The extension's half of the config hand-over: the app stores the config (without the key)
/// in the provider configuration and the private key in the shared Keychain access group.
enum SharedConfig {
    enum Failure: Error {
        case noConfiguration
        case noKey(OSStatus)
    }

    static let keychainService = "net.ztna.agent"
    static let keychainAccount = "agent-key"
    /// The app group both targets carry (entitlements); on macOS it doubles as the Keychain
    /// access group the key is shared through.
    static let keychainGroup = "group.net.ztna.agent"

    static func load(protocolConfiguration: NEVPNProtocol) throws -> AgentConfig {
        guard let proto = protocolConfiguration as? NETunnelProviderProtocol,
              let json = proto.providerConfiguration?["config"] as? String else {
            throw Failure.noConfiguration
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        var config = try decoder.decode(AgentConfig.self, from: Data(json.utf8))
        config.key = try privateKey()
        return config
    }

    static func privateKey() throws -> String {
        let query: [String: Any] = [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: keychainService,
            kSecAttrAccount as String: keychainAccount,
            kSecAttrAccessGroup as String: keychainGroup,
            kSecUseDataProtectionKeychain as String: true,
            kSecReturnData as String: true,
            kSecMatchLimit as String: kSecMatchLimitOne,
        ]
        var item: CFTypeRef?
        let status = SecItemCopyMatching(query as CFDictionary, &item)
        guard status == errSecSuccess, let data = item as? Data else {
            throw Failure.noKey(status)
        }
        return String(decoding: data, as: UTF8.self)
    }
}
