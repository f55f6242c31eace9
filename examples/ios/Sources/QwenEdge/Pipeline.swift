// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/ios/README.md).
// tokenize -> text_encoder -> text_kv (once) -> 4 Euler steps over transformer -> vae_decoder, for a Qwen-Image
// 2.1 Core ML bundle. Mirrors qwen_edge/runtimes/onnx.py (Feeds: padding, rotary tables, biases) and
// qwen_edge/runtimes/coreml.py (chunk chaining); the sampler is qwen_edge/sampler.py's Euler step.
import CoreML
import Foundation
import Tokenizers

public final class QwenEdgePipeline {
    let root: URL
    let manifest: Manifest
    let tokenizer: Tokenizer
    var models: [String: MLModel] = [:]
    let configuration: MLModelConfiguration

    public init(bundle root: URL, computeUnits: MLComputeUnits = .all) async throws {
        self.root = root
        manifest = try Manifest.load(root)
        guard manifest.family == "qwen-image-2.1" else {
            throw QwenEdgeError.unsupported("this example drives qwen-image-2.1 bundles (v1 differs in feeds only)")
        }
        let tokenizerFolder = root.appendingPathComponent(manifest.tokenizer.file).deletingLastPathComponent()
        tokenizer = try await AutoTokenizer.from(modelFolder: tokenizerFolder)
        configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
    }

    /// The image (C, H, W) in about [-1, 1], as the decoder returns it (RGBA for 2.1).
    public func generate(prompt: String, seed: UInt64 = 0, noise: [Float]? = nil) async throws -> [Float] {
        let d = manifest.dims
        // 1. tokenize: template, keep drop + max_length ids, right-pad with pad_id
        let t = manifest.tokenizer
        var ids = tokenizer.encode(text: t.template.replacingOccurrences(of: "{}", with: prompt))
        ids = Array(ids.prefix(t.drop + t.max_length))
        let real = ids.count - t.drop  // prompt tokens after the template
        let padded = ids + [Int](repeating: t.pad_id, count: t.drop + t.max_length - ids.count)
        // 2. text encoder; keep the real prompt tokens after the template, zero-pad them to text_len
        let hidden = try await run("text_encoder", ["input_ids": try multiArray(ints: padded.map(Int32.init),
                                                                                   [1, padded.count])])["hidden_states"]!
        var text = [Float](repeating: 0, count: d.text_len * d.text_hidden)
        let encoded = floats(hidden)
        for i in 0..<real {
            let src = (t.drop + i) * d.text_hidden
            text.replaceSubrange(i * d.text_hidden..<(i + 1) * d.text_hidden, with: encoded[src..<src + d.text_hidden])
        }
        // 3. rotary tables and biases for [text (padded), image grid]; text_kv once per prompt
        let (h, w) = (manifest.latent.shape[2], manifest.latent.shape[3])
        let n = h * w, half = d.head_dim / 2, s = d.text_len + n
        let (cosT, sinT) = ropeV2(axes: manifest.rope.axes_dims, theta: manifest.rope.theta, textLen: real, h: h, w: w,
                                  padLen: d.text_len)
        let bias = attentionBiasV2(textLen: real, nImage: n, padLen: d.text_len)
        let kv = try await run("text_kv", [
            "text": try multiArray(text, [1, d.text_len, d.text_hidden]),
            "rope_cos": try multiArray(Array(cosT[0..<d.text_len * half]), [d.text_len, half]),
            "rope_sin": try multiArray(Array(sinT[0..<d.text_len * half]), [d.text_len, half]),
            "text_bias": try multiArray(rows(bias, cols: s, from: 0, to: d.text_len, colTo: d.text_len),
                                        [1, 1, d.text_len, d.text_len]),
        ])["text_kv"]!
        let fixed: [String: MLMultiArray] = [
            "text_kv": kv,
            "rope_cos": try multiArray(Array(cosT[d.text_len * half..<s * half]), [n, half]),
            "rope_sin": try multiArray(Array(sinT[d.text_len * half..<s * half]), [n, half]),
            "image_bias": try multiArray(rows(bias, cols: s, from: d.text_len, to: s), [1, 1, n, s]),
        ]
        // 4. noise (1, C, h, w) packed to tokens (1, h*w, C), then x <- x + (sigma_next - sigma) * v
        let c = manifest.latent.shape[1]
        let z = noise ?? gaussianNoise(count: c * n, seed: seed)
        var x = [Float](repeating: 0, count: n * c)
        for ch in 0..<c { for p in 0..<n { x[p * c + ch] = z[ch * n + p] } }
        let sigmas = manifest.sampler.sigmas
        for i in 0..<(sigmas.count - 1) {
            var feed = fixed
            feed["latents"] = try multiArray(x, [1, n, c])
            feed["sigma"] = try multiArray([sigmas[i]], [1])  // the pipelines pass timestep / 1000 = sigma
            let v = floats(try await run("transformer", feed)["velocity"]!)
            let dt = sigmas[i + 1] - sigmas[i]
            for j in 0..<x.count { x[j] += dt * v[j] }
        }
        // 5. unpack and decode
        var latents = [Float](repeating: 0, count: c * n)
        for ch in 0..<c { for p in 0..<n { latents[ch * n + p] = x[p * c + ch] } }
        return floats(try await run("vae_decoder", ["latents": try multiArray(latents, [1, c, h, w])])["image"]!)
    }

    /// Run one component: its package, or its chunks in order (each reads the inputs plus what earlier
    /// chunks returned; text_kv chunks' keys/values are concatenated), as CoreMLComponents._run does.
    func run(_ name: String, _ inputs: [String: MLMultiArray]) async throws -> [String: MLMultiArray] {
        guard let comp = manifest.components[name] else { throw QwenEdgeError.bundle("no \(name) in the bundle") }
        let parts = comp.chunks ?? [Package(file: comp.file, inputs: comp.inputs, outputs: comp.outputs, blocks: nil,
                                            function: nil)]
        var state = inputs
        var kvParts: [MLMultiArray] = []
        for part in parts {
            let model = try await load(part.file, function: part.function)
            var feed: [String: MLFeatureValue] = [:]
            for spec in part.inputs {
                guard let value = state[spec.name] else { throw QwenEdgeError.bundle("\(name): no value for \(spec.name)") }
                feed[spec.name] = MLFeatureValue(multiArray: try reshaped(value, spec.shape))
            }
            let out = try await model.prediction(from: try MLDictionaryFeatureProvider(dictionary: feed))
            for spec in part.outputs {
                guard let value = out.featureValue(for: spec.name)?.multiArrayValue else { continue }
                // a chunk returns the carry it updates as next_<name>; the following chunk reads it as <name>
                let key = spec.name.hasPrefix("next_") ? String(spec.name.dropFirst(5)) : spec.name
                if name == "text_kv" && key == "text_kv" { kvParts.append(value) } else { state[key] = value }
            }
        }
        if !kvParts.isEmpty {
            let all = kvParts.flatMap(floats)
            state["text_kv"] = try multiArray(all, [all.count / kvParts[0].shape.dropFirst().reduce(1) { $0 * $1.intValue }]
                                               + kvParts[0].shape.dropFirst().map { $0.intValue })
        }
        return state
    }

    /// Same bytes, the package's shape (Core ML's rank limit folds leading axes).
    func reshaped(_ a: MLMultiArray, _ shape: [Int]) throws -> MLMultiArray {
        if a.shape.map({ $0.intValue }) == shape { return a }
        if a.dataType == .int32 { return a }  // ids are never folded
        return try multiArray(floats(a), shape)
    }

    /// Compile and load a package once per function; `file` is its Manifest.json, the package is the folder
    /// around it. A `function` (iOS 18 bundles: text_kv shares the transformer's package) picks that function.
    func load(_ file: String, function: String?) async throws -> MLModel {
        let key = file + "#" + (function ?? "")
        if let m = models[key] { return m }
        let package = root.appendingPathComponent(file).deletingLastPathComponent()
        let compiled = try await MLModel.compileModel(at: package)
        let config = configuration.copy() as! MLModelConfiguration
        if let function {
            guard #available(iOS 18.0, macOS 15.0, *) else {
                throw QwenEdgeError.unsupported("\(file) holds several functions: it needs iOS 18 / macOS 15")
            }
            config.functionName = function
        }
        let model = try MLModel(contentsOf: compiled, configuration: config)
        models[key] = model
        return model
    }
}
