import SwiftUI
import UniformTypeIdentifiers
import ZtnaKit

struct ContentView: View {
    @EnvironmentObject var manager: TunnelManager
    @State private var importing: PemField?

    enum PemField: String, Identifiable {
        case ca, cert, key
        var id: String { rawValue }
    }

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Form {
                TextField("Relay (address:port)", text: $manager.form.relay)
                TextField("Relay name (in its certificate)", text: $manager.form.relayName)
                HStack {
                    Text(manager.form.ca.isEmpty ? "No CA certificate" : "CA certificate loaded")
                    Spacer()
                    Button("Import CA…") { importing = .ca }
                }
                HStack {
                    Text(manager.form.cert.isEmpty ? "No agent certificate" : "Agent certificate loaded")
                    Spacer()
                    Button("Import certificate…") { importing = .cert }
                }
                HStack {
                    Text(manager.hasKey ? "Private key in the Keychain" : "No private key")
                    Spacer()
                    Button("Import key…") { importing = .key }
                }
            }
            HStack {
                Button(manager.connected ? "Disconnect" : "Connect") {
                    Task { await manager.toggle() }
                }
                .keyboardShortcut(.defaultAction)
                Text(manager.state).foregroundStyle(.secondary)
            }
            if let error = manager.error {
                Text(error).foregroundStyle(.red)
            }
            Divider()
            StatusView(status: manager.status)
        }
        .padding()
        .fileImporter(isPresented: Binding(get: { importing != nil }, set: { if !$0 { importing = nil } }),
                      allowedContentTypes: [.item]) { result in
            guard let field = importing, case let .success(url) = result else { return }
            manager.importPem(field: field.rawValue, from: url)
        }
    }
}

struct StatusView: View {
    let status: AgentStatus?

    var body: some View {
        if let s = status {
            VStack(alignment: .leading, spacing: 6) {
                Text("Relay \(s.relay): \(s.connected ? "connected" : "not connected")"
                     + (s.relayRttMs.map { String(format: ", RTT %.1f ms", $0) } ?? ""))
                Text("Identity \(s.identity), tunnel IP \(s.tunnelIp ?? "-")"
                     + (s.tunnelIpv6.map { ", \($0)" } ?? ""))
                Table(s.connectors) {
                    TableColumn("Connector") { Text($0.name) }
                    TableColumn("Path") { Text($0.path) }
                    TableColumn("RTT") { c in Text(c.rttMs.map { String(format: "%.1f ms", $0) } ?? "-") }
                    TableColumn("Sent") { c in Text(ByteCountFormatter.string(fromByteCount: Int64(c.txBytes), countStyle: .binary)) }
                    TableColumn("Received") { c in Text(ByteCountFormatter.string(fromByteCount: Int64(c.rxBytes), countStyle: .binary)) }
                }
            }
        } else {
            Text("Not running").foregroundStyle(.secondary)
        }
    }
}
