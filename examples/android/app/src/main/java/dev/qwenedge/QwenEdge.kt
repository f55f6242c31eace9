// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// The engine: docs/bundle.md's loop ("The whole loop") over a bundle's graphs on ONNX Runtime Mobile, CPU or
// the QNN execution provider (Qualcomm HTP) when the bundle is a --target qnn export and the AAR has it.
// No Activity and no Android UI types: MainActivity and the instrumented ConformanceTest drive it the same way.
package dev.qwenedge

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtProvider
import ai.onnxruntime.OrtSession
import java.io.File
import java.nio.FloatBuffer
import java.nio.LongBuffer
import java.util.Random

/** An 8-bit RGB image, (height, width, 3) row-major. */
class GeneratedImage(val width: Int, val height: Int, val rgb: ByteArray)

class QwenEdge(
    bundleDir: File,
    useNpu: Boolean = true,                 // QNN (HTP) for --target qnn bundles when the provider is present
    verify: Boolean = true,                 // check every file's sha256 first (reads every byte once)
    private val lowMemory: Boolean = false, // one session alive at a time, as qwen-edge's --low-memory
    private val threads: Int = 0            // intra-op threads; 0: ONNX Runtime's default
) : AutoCloseable {
    val manifest: BundleManifest = BundleManifest.load(bundleDir, verify)
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val tokenizer = BpeTokenizer.fromFile(manifest.file(manifest.tokenizerFile))
    private val sessions = HashMap<String, OrtSession>()

    /** "QNN (HTP)" or "CPU". Nodes the HTP cannot run fall back to the CPU (ORT's default; qwen-edge's Python
     *  runtime disables that fallback to name them instead). */
    val backend: String =
        if (useNpu && manifest.target == "qnn" && OrtProvider.QNN in OrtEnvironment.getAvailableProviders()) "QNN (HTP)"
        else "CPU"

    /** Receives every intermediate under its conformance-vector name (docs/bundle.md); null in the app. */
    var trace: ((String, NpyArray) -> Unit)? = null

    /** Whether the last prompt was cut to the text encoder's maximum (say so to the user). */
    var truncated: Boolean = false
        private set

    /** The latent noise's size: latent.shape = (1, C, H/f, W/f). */
    val noiseSize: Int get() = manifest.latentShape.fold(1L) { a, b -> a * b }.toInt()

    /**
     * Standard-normal noise from java.util.Random. NOT NumPy's PCG64 + float32 ziggurat (qwen_edge.latents): the
     * same seed gives a different (equally valid) image than the Python runtimes. To reproduce one of theirs, pass
     * its noise (the conformance vectors' noise.npy, or `qwen-edge generate --noise`).
     */
    fun noiseFor(seed: Long): FloatArray {
        val random = Random(seed)
        return FloatArray(noiseSize) { random.nextGaussian().toFloat() }
    }

    /** Prompt + unpacked noise (latent.shape, float32) -> image. */
    fun generate(prompt: String, noise: FloatArray): GeneratedImage {
        val m = manifest
        require(noise.size == noiseSize) { "noise must hold $noiseSize values (latent.shape), not ${noise.size}" }
        val (text, n) = encode(prompt)
        val (h, w) = m.grid
        val c = m.latentShape[1].toInt()
        val hl = m.latentShape[2].toInt()
        val wl = m.latentShape[3].toInt()
        emit("sigmas", longArrayOf(m.sigmas.size.toLong()), floats = m.sigmas)
        val fixed = if (m.isV21) fixedV21(text, n, h, w) else fixedV1(text, n, h, w)
        var x = Tables.pack(noise, c, hl, wl, m.patch)  // (1, N, C')
        val timesteps = FloatArray(m.steps)
        try {
            for (i in 0 until m.steps) {
                val t = (m.sigmas[i] * 1000f) / 1000f  // float32, as the pipelines feed sigma (timestep / 1000)
                timesteps[i] = t
                val v = run("transformer", mapOf("latents" to x, "sigma" to floatArrayOf(t)), fixed).getValue("velocity")
                val dt = m.sigmas[i + 1] - m.sigmas[i]  // float32
                x = FloatArray(x.size) { j -> x[j] + dt * v[j] }
                emit("latents_${i + 1}", m.packedShape, floats = x)
            }
        } finally {
            fixed.values.forEach { it.close() }
        }
        emit("timesteps", longArrayOf(m.steps.toLong()), floats = timesteps)
        if (lowMemory) close("transformer")
        val decoded = run("vae_decoder", mapOf("latents" to Tables.unpack(x, c, hl, wl, m.patch))).getValue("image")
        emit("decoded", m.component("vae_decoder").outputs.first().shape, floats = decoded)
        val image = GeneratedImage(m.width, m.height, toRgb(decoded, m.height, m.width))
        emit("image", longArrayOf(m.height.toLong(), m.width.toLong(), 3), bytes = image.rgb)
        return image
    }

    /** Tokenize, pad, encode: the prompt's states zero-padded to (1, T, text_hidden), and their count n. */
    private fun encode(prompt: String): Pair<FloatArray, Int> {
        val m = manifest
        require(prompt.isNotBlank()) { "the prompt is empty; say what the image should show" }
        val ids = tokenizer.encode(m.template.replace("{}", prompt))
        val total = m.drop + m.textLen
        truncated = ids.size > total
        val kept = ids.take(total)
        val n = kept.size - m.drop
        emit("token_ids", longArrayOf(1, kept.size.toLong()), longs = kept.toLongArray())
        val inputIds = LongArray(total) { if (it < kept.size) kept[it] else m.padId }
        emit("text_encoder.input_ids", longArrayOf(1, total.toLong()), longs = inputIds)
        val hidden = run("text_encoder", mapOf("input_ids" to inputIds)).getValue("hidden_states")  // (1, D+T, H)
        if (lowMemory) close("text_encoder")
        val text = FloatArray(m.textLen * m.textHidden)  // rows D .. D+n-1, then zeros
        System.arraycopy(hidden, m.drop * m.textHidden, text, 0, n * m.textHidden)
        emit("text_embeddings", longArrayOf(1, m.textLen.toLong(), m.textHidden.toLong()), floats = text)
        return Pair(text, n)
    }

    /** 2.1: text K/V once per prompt; the transformer's per-prompt inputs (kept open over the steps). */
    private fun fixedV21(text: FloatArray, n: Int, h: Int, w: Int): Map<String, OnnxTensor> {
        val m = manifest
        val t = m.textLen
        val size = t + h * w
        val rope = Tables.ropeV21(m.axesDims, n, h, w, m.theta, t)  // (T + N, half)
        val bias = Tables.biasV21(n, h * w, t)  // (S, S)
        val textRope = rope.slice(0, t)
        val kvFeed = mapOf("text" to text, "rope_cos" to textRope.cos, "rope_sin" to textRope.sin,
                           "text_bias" to Tables.topLeft(bias, size, t))
        for ((name, values) in kvFeed) if (name != "text") emit("text_kv.$name", inputShape("text_kv", name), floats = values)
        val kv = run("text_kv", kvFeed).getValue("text_kv")  // (layers, 2, 1, heads, T, head_dim)
        if (lowMemory) close("text_kv")
        val imageRope = rope.slice(t, size)
        val step = mapOf("text_kv" to kv, "rope_cos" to imageRope.cos, "rope_sin" to imageRope.sin,
                         "image_bias" to Tables.rows(bias, size, t, size))
        for ((name, values) in step) if (name != "text_kv") emit("transformer.$name", inputShape("transformer", name), floats = values)
        return step.mapValues { (name, values) -> tensor("transformer", name, values) }
    }

    /** v1: rotary tables of the image and text tokens and the text-padding bias (kept open over the steps). */
    private fun fixedV1(text: FloatArray, n: Int, h: Int, w: Int): Map<String, OnnxTensor> {
        val m = manifest
        val (image, txt) = Tables.ropeV1(m.textLen, h, w, m.axesDims, m.theta)
        val step = mapOf("img_cos" to image.cos, "img_sin" to image.sin, "txt_cos" to txt.cos, "txt_sin" to txt.sin,
                         "text_bias" to Tables.biasV1(n, h * w, m.textLen))
        for ((name, values) in step) emit("transformer.$name", inputShape("transformer", name), floats = values)
        return (step + ("text" to text)).mapValues { (name, values) -> tensor("transformer", name, values) }
    }

    /** Run a graph: [arrays] become input tensors (closed here), [fixed] tensors stay open. Float outputs by name. */
    private fun run(name: String, arrays: Map<String, Any>, fixed: Map<String, OnnxTensor> = emptyMap()): Map<String, FloatArray> {
        val fresh = arrays.mapValues { (input, values) -> tensor(name, input, values) }
        try {
            session(name).run(fixed + fresh).use { result ->
                return result.associate { (output, value) ->
                    val buffer = (value as OnnxTensor).floatBuffer
                    output to FloatArray(buffer.remaining()).also { buffer.get(it) }
                }
            }
        } finally {
            fresh.values.forEach { it.close() }
        }
    }

    /** A tensor of the shape the manifest declares for this graph input (static shapes: docs/bundle.md). */
    private fun tensor(component: String, input: String, values: Any): OnnxTensor {
        val shape = inputShape(component, input)
        return when (values) {
            is FloatArray -> OnnxTensor.createTensor(env, FloatBuffer.wrap(values), shape)
            is LongArray -> OnnxTensor.createTensor(env, LongBuffer.wrap(values), shape)
            else -> throw IllegalArgumentException("$component.$input: unsupported values ${values.javaClass}")
        }
    }

    private fun inputShape(component: String, input: String): LongArray =
        manifest.component(component).inputs.firstOrNull { it.name == input }?.shape
            ?: throw BundleException("$component has no input $input in the manifest")

    /** The component's session, opened on first use from its ORT-format copy when the bundle has one. */
    private fun session(name: String): OrtSession = sessions.getOrPut(name) {
        if (lowMemory) close()
        OrtSession.SessionOptions().use { options ->
            options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
            if (threads > 0) options.setIntraOpNumThreads(threads)
            if (backend.startsWith("QNN")) {
                options.addQnn(mapOf("backend_path" to "libQnnHtp.so", "htp_performance_mode" to "burst"))
            }
            env.createSession(manifest.modelFile(name).path, options)
        }
    }

    private fun close(name: String) {
        sessions.remove(name)?.close()
    }

    /** Free every session. */
    override fun close() {
        sessions.values.forEach { it.close() }
        sessions.clear()
    }

    private fun emit(name: String, shape: LongArray, floats: FloatArray? = null, longs: LongArray? = null, bytes: ByteArray? = null) {
        trace?.invoke(name, NpyArray(shape, floats, longs, bytes))
    }

    companion object {
        /** (1, C, H, W) decoder output in [-1, 1] -> (H, W, 3) bytes: round(clip(x/2 + 0.5, 0, 1) * 255) in float32,
         *  rounding half to even as NumPy does. 2.1 decodes RGBA: the first three channels. */
        fun toRgb(image: FloatArray, height: Int, width: Int): ByteArray {
            val plane = height * width
            val out = ByteArray(plane * 3)
            for (i in 0 until plane) for (ch in 0 until 3) {
                val v = ((image[ch * plane + i] / 2f + 0.5f).coerceIn(0f, 1f) * 255f).toDouble()
                out[i * 3 + ch] = Math.rint(v).toInt().toByte()
            }
            return out
        }
    }
}
