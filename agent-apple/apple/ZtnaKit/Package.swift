// swift-tools-version:5.9
// ZtnaKit: Swift types over the ztna-apple C ABI (include/ztna.h). The binary target is the
// XCFramework that ../../build-mac.sh builds (into this folder) from the Rust static library (module `ZtnaCore`).
import PackageDescription

let package = Package(
    name: "ZtnaKit",
    platforms: [.macOS(.v13), .iOS(.v16)],
    products: [
        .library(name: "ZtnaKit", targets: ["ZtnaKit"]),
    ],
    targets: [
        .binaryTarget(name: "ZtnaCore", path: "ZtnaCore.xcframework"),
        .target(
            name: "ZtnaKit",
            dependencies: ["ZtnaCore"],
            linkerSettings: [.linkedLibrary("resolv")]
        ),
    ]
)
