import SwiftUI

@main
struct ZtnaApp: App {
    @StateObject private var manager = TunnelManager()

    var body: some Scene {
        WindowGroup("ztna") {
            ContentView()
                .environmentObject(manager)
                .frame(minWidth: 520, minHeight: 480)
                .task { await manager.load() }
        }
    }
}
