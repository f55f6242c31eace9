// swift-tools-version:5.9
// NOT COMPILED BY THIS REPOSITORY'S CI (see README.md): an example of driving a qwen-edge Core ML bundle.
import PackageDescription

let package = Package(
    name: "QwenEdge",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [.library(name: "QwenEdge", targets: ["QwenEdge"])],
    dependencies: [
        .package(url: "https://github.com/huggingface/swift-transformers", from: "0.1.17"),
    ],
    targets: [
        .target(name: "QwenEdge", dependencies: [.product(name: "Transformers", package: "swift-transformers")]),
    ]
)
