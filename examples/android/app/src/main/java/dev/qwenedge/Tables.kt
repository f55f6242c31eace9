// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// Rotary tables, attention biases and latent packing, ported line for line from qwen_edge/rope.py,
// qwen_edge/rope_v1.py and qwen_edge/latents.py (docs/bundle.md, "Driving the components", sections 2 and 3).
// Arrays are row-major FloatArrays; shapes are in the comments.
package dev.qwenedge

/** Additive bias of a forbidden (query, key) pair: finite, so fp16 graphs stay NaN-free. */
const val MASKED = -65504.0f

class RopeTables(val cos: FloatArray, val sin: FloatArray, val rows: Int, val half: Int) {
    /** Rows [from, until) as their own (until - from, half) arrays. */
    fun slice(from: Int, until: Int) = RopeTables(
        cos.copyOfRange(from * half, until * half), sin.copyOfRange(from * half, until * half), until - from, half
    )
}

object Tables {
    /**
     * cos/sin (rows, sum(axesDims)/2) of integer (frame, row, column) positions. Per axis of size d:
     * inv[j] = 1 / float32(theta ** float32(2j / d)); angle = float32(p) * inv[j] in float32; cos/sin in double of
     * the float32 angle, rounded to float32 (qwen_edge.rope._axis_angles).
     */
    fun table(positions: Array<IntArray>, axesDims: IntArray, theta: Double): RopeTables {
        val half = axesDims.sum() / 2
        val cos = FloatArray(positions.size * half)
        val sin = FloatArray(positions.size * half)
        var col = 0
        for ((axis, d) in axesDims.withIndex()) {
            val inv = FloatArray(d / 2) { j ->
                val exponent = (2 * j).toFloat() / d.toFloat()
                1.0f / Math.pow(theta, exponent.toDouble()).toFloat()
            }
            for ((row, pos) in positions.withIndex()) {
                for (j in inv.indices) {
                    val angle = pos[axis].toFloat() * inv[j]
                    cos[row * half + col + j] = Math.cos(angle.toDouble()).toFloat()
                    sin[row * half + col + j] = Math.sin(angle.toDouble()).toFloat()
                }
            }
            col += d / 2
        }
        return RopeTables(cos, sin, positions.size, half)
    }

    /** Centred grid coordinates: -(n - n/2) .. n/2 - 1 (one more below zero for odd n). */
    private fun centred(n: Int) = IntArray(n) { it - (n - n / 2) }

    /**
     * Qwen-Image 2.1: the joint [text padded to T, image h x w] table. Text token i sits at (i, i, i); image token
     * (r, c) at (n, r - (h - h/2), c - (w - w/2)), following the REAL prompt length n, not T. (T + h*w, half)
     */
    fun ropeV21(axesDims: IntArray, n: Int, h: Int, w: Int, theta: Double, textLen: Int): RopeTables {
        val rows = centred(h)
        val cols = centred(w)
        val positions = Array(textLen + h * w) { i ->
            if (i < textLen) intArrayOf(i, i, i) else (i - textLen).let { k -> intArrayOf(n, rows[k / w], cols[k % w]) }
        }
        return table(positions, axesDims, theta)
    }

    /**
     * Qwen-Image 2.1: block-causal bias (S, S), S = T + N. Key k is real when k < n or k >= T; a text query q < T
     * sees real keys k <= q, an image query every real key. 0 where allowed, MASKED elsewhere.
     */
    fun biasV21(n: Int, nImage: Int, textLen: Int): FloatArray {
        val size = textLen + nImage
        return FloatArray(size * size) { idx ->
            val q = idx / size
            val k = idx % size
            val real = k < n || k >= textLen
            if (real && (k <= q || q >= textLen)) 0.0f else MASKED
        }
    }

    /** Rows [from, until) of a (size, size) matrix: (until - from, size). */
    fun rows(m: FloatArray, size: Int, from: Int, until: Int): FloatArray = m.copyOfRange(from * size, until * size)

    /** Rows and columns [0, t) of a (size, size) matrix: (t, t). */
    fun topLeft(m: FloatArray, size: Int, t: Int) = FloatArray(t * t) { m[(it / t) * size + it % t] }

    /**
     * Qwen-Image v1 over the h x w grid of 2x2 patches: image (0, r - (h - h/2), c - (w - w/2)); text j < T at
     * (p, p, p), p = max(h/2, w/2) + j. Returns (image table (N, half), text table (T, half)).
     */
    fun ropeV1(textLen: Int, h: Int, w: Int, axesDims: IntArray, theta: Double): Pair<RopeTables, RopeTables> {
        val rows = centred(h)
        val cols = centred(w)
        val image = Array(h * w) { intArrayOf(0, rows[it / w], cols[it % w]) }
        val start = maxOf(h / 2, w / 2)
        val text = Array(textLen) { j -> IntArray(3) { start + j } }
        return Pair(table(image, axesDims, theta), table(text, axesDims, theta))
    }

    /** v1's text bias (1, 1, 1, T + N): MASKED at the padded text keys n .. T-1. */
    fun biasV1(n: Int, nImage: Int, textLen: Int) = FloatArray(textLen + nImage) { if (it in n until textLen) MASKED else 0.0f }

    /**
     * Unpacked (1, C, h, w) -> tokens. patch 1 (2.1): (1, h*w, C) row-major. patch 2 (v1): (1, (h/2)(w/2), 4C),
     * token (py, px) in row-major order, channel c*4 + dy*2 + dx.
     */
    fun pack(x: FloatArray, c: Int, h: Int, w: Int, patch: Int): FloatArray {
        val out = FloatArray(x.size)
        if (patch == 1) {
            for (ch in 0 until c) for (i in 0 until h * w) out[i * c + ch] = x[ch * h * w + i]
            return out
        }
        val gw = w / 2
        for (ch in 0 until c) for (y in 0 until h) for (xx in 0 until w) {
            val token = (y / 2) * gw + xx / 2
            val channel = ch * 4 + (y % 2) * 2 + xx % 2
            out[token * 4 * c + channel] = x[(ch * h + y) * w + xx]
        }
        return out
    }

    /** Inverse of [pack]: tokens -> (1, C, h, w). */
    fun unpack(tokens: FloatArray, c: Int, h: Int, w: Int, patch: Int): FloatArray {
        val out = FloatArray(tokens.size)
        if (patch == 1) {
            for (ch in 0 until c) for (i in 0 until h * w) out[ch * h * w + i] = tokens[i * c + ch]
            return out
        }
        val gw = w / 2
        for (ch in 0 until c) for (y in 0 until h) for (xx in 0 until w) {
            val token = (y / 2) * gw + xx / 2
            val channel = ch * 4 + (y % 2) * 2 + xx % 2
            out[(ch * h + y) * w + xx] = tokens[token * 4 * c + channel]
        }
        return out
    }
}
