// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/ios/README.md).
// Rotary tables and attention biases of Qwen-Image 2.1, ported from qwen_edge/rope.py, and MLMultiArray helpers.
import CoreML
import Foundation

let masked: Float = -65504  // qwen_edge.rope.MASKED: finite in fp16, exp() of it is 0 in fp32

/// (frame, height, width) positions of [text padded to padLen, image h x w] (rope.positions_v2).
func positionsV2(textLen: Int, h: Int, w: Int, padLen: Int) -> [[Int]] {
    var pos = (0..<padLen).map { [$0, $0, $0] }
    let rows = Array(-(h - h / 2)..<(h / 2)), cols = Array(-(w - w / 2)..<(w / 2))
    for r in rows { for c in cols { pos.append([textLen, r, c]) } }
    return pos
}

/// cos/sin tables, each (padLen + h*w) x (headDim / 2), interleaved-pair layout (rope.rope_v2).
/// Python rounds every step through float32 (and a correctly rounded powf); Float here does the same.
func ropeV2(axes: [Int], theta: Double, textLen: Int, h: Int, w: Int, padLen: Int) -> (cos: [Float], sin: [Float]) {
    let pos = positionsV2(textLen: textLen, h: h, w: w, padLen: padLen)
    var cosT = [Float](), sinT = [Float]()
    for p in pos {
        for (a, dim) in axes.enumerated() {
            for i in stride(from: 0, to: dim, by: 2) {
                let exponent = Float(i) / Float(dim)
                let invFreq = Float(1) / Float(pow(theta, Double(exponent)))
                let angle = Double(Float(p[a]) * invFreq)
                cosT.append(Float(cos(angle)))
                sinT.append(Float(sin(angle)))
            }
        }
    }
    return (cosT, sinT)
}

/// Block-causal additive bias (1, 1, S, S), S = padLen + nImage (rope.attention_bias_v2).
func attentionBiasV2(textLen: Int, nImage: Int, padLen: Int) -> [Float] {
    let size = padLen + nImage
    var bias = [Float](repeating: 0, count: size * size)
    for q in 0..<size {
        for k in 0..<size {
            let realKey = k < textLen || k >= padLen
            let allowed = realKey && (k <= q || q >= padLen)
            bias[q * size + k] = allowed ? 0 : masked
        }
    }
    return bias
}

/// Rows [from, to) of a row-major matrix with `cols` columns; for a (1, 1, S, S) bias, rows of the last two dims.
func rows(_ x: [Float], cols: Int, from: Int, to: Int, colFrom: Int = 0, colTo: Int? = nil) -> [Float] {
    let end = colTo ?? cols
    var out = [Float]()
    out.reserveCapacity((to - from) * (end - colFrom))
    for r in from..<to { out.append(contentsOf: x[(r * cols + colFrom)..<(r * cols + end)]) }
    return out
}

func multiArray(_ values: [Float], _ shape: [Int]) throws -> MLMultiArray {
    let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
    values.withUnsafeBufferPointer { src in
        a.dataPointer.bindMemory(to: Float.self, capacity: values.count).update(from: src.baseAddress!, count: values.count)
    }
    return a
}

func multiArray(ints: [Int32], _ shape: [Int]) throws -> MLMultiArray {
    let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
    ints.withUnsafeBufferPointer { src in
        a.dataPointer.bindMemory(to: Int32.self, capacity: ints.count).update(from: src.baseAddress!, count: ints.count)
    }
    return a
}

/// Values of a Core ML output as [Float] in row-major order (outputs may come back as fp16 or fp32).
func floats(_ a: MLMultiArray) -> [Float] {
    var out = [Float](repeating: 0, count: a.count)
    for i in 0..<a.count { out[i] = a[i].floatValue }
    return out
}

/// Seeded standard-normal noise (Box-Muller over a SplitMix64 stream). Not NumPy's PCG64: see README.md.
func gaussianNoise(count: Int, seed: UInt64) -> [Float] {
    var state = seed &+ 0x9E37_79B9_7F4A_7C15
    func next() -> Double {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return Double((z ^ (z >> 31)) >> 11) / Double(1 << 53)
    }
    return (0..<count).map { _ in Float(sqrt(-2 * log(max(next(), 1e-300))) * cos(2 * Double.pi * next())) }
}
