import Foundation
import NetworkExtension
import Security
import ZtnaKit

/// The app's side: the form, the Keychain, `NETunnelProviderManager` and the status poll.
@MainActor
final class TunnelManager: ObservableObject {
    struct Form: Codable {
        var relay = ""
        var relayName = "relay"
        var ca = ""
        var cert = ""
    }

    @Published var form = Form()
    @Published var status: AgentStatus?
    @Published var state = "disconnected"
    @Published var error: String?
    @Published var hasKey = false

    static let extensionBundleId = "net.ztna.agent.tunnel"
    static let keychainService = "net.ztna.agent"
    static let keychainAccount = "agent-key"
    /// The app group both targets carry (entitlements); on macOS it doubles as the Keychain
    /// access group the key is shared through.
    static let keychainGroup = "group.net.ztna.agent"

    private var manager: NETunnelProviderManager?
    private var poll: Task<Void, Never>?

    var connected: Bool {
        guard let s = manager?.connection.status else { return false }
        return s == .connected || s == .connecting || s == .reasserting
    }

    func load() async {
        do {
            let all = try await NETunnelProviderManager.loadAllFromPreferences()
            let m = all.first ?? NETunnelProviderManager()
            manager = m
            if let proto = m.protocolConfiguration as? NETunnelProviderProtocol,
               let json = proto.providerConfiguration?["form"] as? String,
               let saved = try? JSONDecoder().decode(Form.self, from: Data(json.utf8)) {
                form = saved
            }
            hasKey = (try? readKey()) != nil
            startPolling()
        } catch {
            self.error = "loading the VPN configuration: \(error.localizedDescription)"
        }
    }

    /// Reads a PEM file the user picked; the key goes to the Keychain, never to preferences.
    func importPem(field: String, from url: URL) {
        let scoped = url.startAccessingSecurityScopedResource()
        defer { if scoped { url.stopAccessingSecurityScopedResource() } }
        guard let text = try? String(contentsOf: url, encoding: .utf8), text.contains("-----BEGIN") else {
            error = "\(url.lastPathComponent) is not a PEM file"
            return
        }
        switch field {
        case "ca": form.ca = text
        case "cert": form.cert = text
        default:
            do {
                try storeKey(text)
                hasKey = true
            } catch {
                self.error = "storing the key in the Keychain: \(error)"
            }
        }
    }

    func toggle() async {
        error = nil
        guard let m = manager else { return }
        if connected {
            m.connection.stopVPNTunnel()
            return
        }
        do {
            let config = AgentConfig(relay: form.relay, relayName: form.relayName, ca: form.ca,
                                     cert: form.cert, key: "")
            let proto = NETunnelProviderProtocol()
            proto.providerBundleIdentifier = Self.extensionBundleId
            proto.serverAddress = form.relay
            proto.providerConfiguration = [
                "config": try config.json(),
                "form": String(decoding: try JSONEncoder().encode(form), as: UTF8.self),
            ]
            m.protocolConfiguration = proto
            m.localizedDescription = "ztna"
            m.isEnabled = true
            try await m.saveToPreferences()
            try await m.loadFromPreferences()
            try m.connection.startVPNTunnel()
        } catch {
            self.error = "connecting: \(error.localizedDescription)"
        }
    }

    private func startPolling() {
        poll?.cancel()
        poll = Task { [weak self] in
            while !Task.isCancelled {
                await self?.refresh()
                try? await Task.sleep(nanoseconds: 1_000_000_000)
            }
        }
    }

    private func refresh() async {
        guard let m = manager, let session = m.connection as? NETunnelProviderSession else { return }
        state = String(describing: m.connection.status)
        guard m.connection.status == .connected else {
            status = nil
            return
        }
        let data: Data? = await withCheckedContinuation { done in
            do {
                try session.sendProviderMessage(Data("status".utf8)) { done.resume(returning: $0) }
            } catch {
                done.resume(returning: nil)
            }
        }
        status = data.flatMap { try? AgentStatus.decode($0) }
    }

    private func storeKey(_ pem: String) throws {
        let base: [String: Any] = [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: Self.keychainService,
            kSecAttrAccount as String: Self.keychainAccount,
            kSecAttrAccessGroup as String: Self.keychainGroup,
            kSecUseDataProtectionKeychain as String: true,
        ]
        SecItemDelete(base as CFDictionary)
        var add = base
        add[kSecValueData as String] = Data(pem.utf8)
        add[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        let status = SecItemAdd(add as CFDictionary, nil)
        guard status == errSecSuccess else {
            throw NSError(domain: NSOSStatusErrorDomain, code: Int(status))
        }
    }

    private func readKey() throws -> String {
        let query: [String: Any] = [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: Self.keychainService,
            kSecAttrAccount as String: Self.keychainAccount,
            kSecAttrAccessGroup as String: Self.keychainGroup,
            kSecUseDataProtectionKeychain as String: true,
            kSecReturnData as String: true,
            kSecMatchLimit as String: kSecMatchLimitOne,
        ]
        var item: CFTypeRef?
        let status = SecItemCopyMatching(query as CFDictionary, &item)
        guard status == errSecSuccess, let data = item as? Data else {
            throw NSError(domain: NSOSStatusErrorDomain, code: Int(status))
        }
        return String(decoding: data, as: UTF8.self)
    }
}
