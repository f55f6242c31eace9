// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/ios/README.md).
// The fields of a qwen-edge bundle's manifest.json that the 4-step loop reads (docs/bundle.md has them all).
import Foundation

struct TensorSpec: Codable {
    let name: String
    let shape: [Int]
    let dtype: String
}

/// One package of a component: the whole component, or a chunk of its blocks (run in order).
struct Package: Codable {
    let file: String          // the package's Manifest.json; the .mlpackage is its folder
    let inputs: [TensorSpec]  // the package's own I/O (Core ML folds rank > 5 by merging leading axes)
    let outputs: [TensorSpec]
    let blocks: [Int]?
    let function: String?     // iOS 18 bundles: text_kv is function "text_kv" of the transformer's package
}

struct Component: Codable {
    let file: String
    let format: String        // "mlpackage"
    let inputs: [TensorSpec]  // the component's I/O in qwen_edge.iospec's layout
    let outputs: [TensorSpec]
    let files: [String: String]  // bundle path -> sha256 (check before loading on untrusted storage)
    let chunks: [Package]?
}

struct Sampler: Codable {
    let steps: Int
    let sigmas: [Float]       // steps + 1 values, exact float32, ending in 0
}

struct TokenizerInfo: Codable {
    let file: String
    let template: String      // one "{}" where the prompt goes
    let drop: Int             // template tokens whose hidden states are discarded
    let max_length: Int       // prompt tokens kept after them (= text_len)
    let pad_id: Int
}

struct Dims: Codable {
    let family: String
    let height: Int
    let width: Int
    let text_len: Int
    let drop: Int
    let text_hidden: Int
    let z_channels: Int
    let heads: Int
    let head_dim: Int
    let layers: Int
}

struct Latent: Codable {
    let shape: [Int]          // unpacked noise (1, C, h, w)
    let packed_shape: [Int]   // transformer tokens (1, N, C'); 2.1: flatten(2).transpose(1, 2)
    let vae_factor: Int
    let patch: Int
}

struct Rope: Codable {
    let axes_dims: [Int]      // (frame, height, width)
    let theta: Double
}

struct Manifest: Codable {
    let format: String
    let format_version: Int
    let family: String
    let target: String
    let height: Int
    let width: Int
    let text_len: Int
    let dims: Dims
    let latent: Latent
    let rope: Rope
    let sampler: Sampler
    let tokenizer: TokenizerInfo
    let components: [String: Component]

    static func load(_ root: URL) throws -> Manifest {
        let data = try Data(contentsOf: root.appendingPathComponent("manifest.json"))
        let m = try JSONDecoder().decode(Manifest.self, from: data)
        guard m.format == "qwen-edge-bundle", m.format_version == 1, m.target == "coreml" else {
            throw QwenEdgeError.bundle("not a version-1 qwen-edge Core ML bundle")
        }
        return m
    }
}

enum QwenEdgeError: Error {
    case bundle(String)
    case unsupported(String)
}
