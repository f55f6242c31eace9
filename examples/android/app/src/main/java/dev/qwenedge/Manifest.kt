// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// A qwen-edge bundle's manifest.json, read with org.json: the fields the 4-step loop and the conformance test
// use, the safety checks of docs/bundle.md ("Loading a bundle safely") and the bundle id ("Checking a port").
package dev.qwenedge

import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.security.MessageDigest

class BundleException(message: String) : Exception(message)

class TensorSpec(val name: String, val shape: LongArray, val dtype: String)

class ComponentSpec(
    val name: String,
    val file: String,                 // the .onnx graph
    val inputs: List<TensorSpec>,     // graph order, static shapes (qwen_edge.iospec)
    val outputs: List<TensorSpec>,
    val files: Map<String, String>    // bundle path -> sha256
)

class BundleManifest private constructor(val root: File, json: JSONObject) {
    val family: String = json.getString("family")
    val target: String = json.getString("target")                 // "onnx" (CPU) or "qnn" (HTP, w8a16)
    val recipe: String = json.getJSONObject("quant").getString("recipe")
    val height: Int = json.getInt("height")
    val width: Int = json.getInt("width")
    val textLen: Int = json.getInt("text_len")                     // T

    private val dims = json.getJSONObject("dims")
    val textHidden: Int = dims.getInt("text_hidden")

    private val latent = json.getJSONObject("latent")
    val latentShape: LongArray = longs(latent.getJSONArray("shape"))          // (1, C, H/f, W/f): the noise
    val packedShape: LongArray = longs(latent.getJSONArray("packed_shape"))   // (1, N, C')
    val patch: Int = latent.getInt("patch")                                   // 1 for 2.1, 2 for v1

    private val rope = json.getJSONObject("rope")
    val axesDims: IntArray = longs(rope.getJSONArray("axes_dims")).map { it.toInt() }.toIntArray()
    val theta: Double = rope.getDouble("theta")

    private val sampler = json.getJSONObject("sampler")
    val steps: Int = sampler.getInt("steps")
    val sigmas: FloatArray = sampler.getJSONArray("sigmas").let { a -> FloatArray(a.length()) { a.getDouble(it).toFloat() } }

    private val tok = json.getJSONObject("tokenizer")
    val tokenizerFile: String = checkPath(tok.getString("file"))
    val template: String = tok.getString("template")               // one "{}" where the prompt goes
    val drop: Int = tok.getInt("drop")                             // D: template tokens whose states are dropped
    val padId: Long = tok.getLong("pad_id")
    val tokenizerFiles: Map<String, String> = hashes(tok.getJSONObject("files"))

    val components: Map<String, ComponentSpec> = json.getJSONObject("components").let { c ->
        c.keys().asSequence().associateWith { component(it, c.getJSONObject(it)) }
    }

    /** ORT-format models (export --ort-format): component -> .ort file, and their hashes. Empty without them. */
    val ortModels: Map<String, String> = json.optJSONObject("ort")?.getJSONObject("models")?.let { m ->
        m.keys().asSequence().associateWith { checkPath(m.getString(it)) }
    } ?: emptyMap()
    val ortFiles: Map<String, String> = json.optJSONObject("ort")?.let { hashes(it.getJSONObject("files")) } ?: emptyMap()

    /** The conformance vectors' listing (export --test-vectors), or null. */
    val vectors: JSONObject? = json.optJSONObject("vectors")

    val isV21: Boolean get() = family == "qwen-image-2.1"
    /** The transformer's token grid (h, w): the latent grid over the patch size. */
    val grid: Pair<Int, Int> get() = Pair(latentShape[2].toInt() / patch, latentShape[3].toInt() / patch)

    /** A bundle file, refusing any path that leaves the bundle (symlinks included). */
    fun file(rel: String): File {
        val path = File(root, checkPath(rel)).canonicalFile
        if (!path.path.startsWith(root.canonicalPath + File.separator)) {
            throw BundleException("$rel leads outside the bundle")
        }
        return path
    }

    /** The model to open for a component: its ORT-format copy when the bundle has one (ORT Mobile's format). */
    fun modelFile(name: String): File = file(ortModels[name] ?: component(name).file)

    fun component(name: String): ComponentSpec =
        components[name] ?: throw BundleException("the bundle has no $name component; re-export it")

    /** Check the sha256 of every listed file (docs/bundle.md, step 3). Reads every byte: skip on trusted storage. */
    fun verify(files: Map<String, String>) {
        for ((rel, digest) in files) {
            val f = file(rel)
            if (!f.isFile) throw BundleException("bundle file $rel is missing")
            if (sha256(f) != digest) throw BundleException("bundle file $rel does not match its sha256")
        }
    }

    /** The files generation reads: tokenizer, components (and their ORT-format copies when present). */
    fun modelFiles(): Map<String, String> =
        tokenizerFiles + components.values.flatMap { it.files.entries }.associate { it.key to it.value }

    /**
     * The bundle id (docs/bundle.md, "Checking a port"): sha256 of UTF-8 lines naming the family, the static
     * sizes, the sigmas' float32 bit patterns and every tokenizer and component file's sha256, sorted by path.
     */
    fun bundleId(): String {
        val bits = sigmas.joinToString(" ") { Integer.toHexString(java.lang.Float.floatToRawIntBits(it)).padStart(8, '0') }
        val lines = mutableListOf("qwen-edge-bundle-id 1", "family $family", "size $height $width $textLen", "sigmas $bits")
        val files = modelFiles()
        for (rel in files.keys.sorted()) lines.add("$rel ${files[rel]}")
        val digest = MessageDigest.getInstance("SHA-256").digest(lines.joinToString("") { "$it\n" }.toByteArray())
        return digest.joinToString("") { "%02x".format(it) }
    }

    private fun component(name: String, c: JSONObject) = ComponentSpec(
        name, checkPath(c.getString("file")), tensors(c.getJSONArray("inputs")), tensors(c.getJSONArray("outputs")),
        hashes(c.getJSONObject("files"))
    )

    companion object {
        /** Read and check ``root/manifest.json``; with [verify], also every graph and tokenizer file's sha256. */
        fun load(root: File, verify: Boolean = true): BundleManifest {
            val text = File(root, "manifest.json").takeIf { it.isFile }?.readText()
                ?: throw BundleException("$root is not a qwen-edge bundle: manifest.json is missing")
            val json = JSONObject(text)
            if (json.optString("format") != "qwen-edge-bundle") throw BundleException("not a qwen-edge bundle")
            if (json.optInt("format_version") != 1) {
                throw BundleException("bundle format_version ${json.opt("format_version")} is not supported (this app reads 1)")
            }
            val manifest = BundleManifest(root.canonicalFile, json)
            if (verify) manifest.verify(manifest.modelFiles() + manifest.ortFiles)
            return manifest
        }

        /** docs/bundle.md, step 2: relative, '/' separators, no '..' or '.', no backslash or drive prefix. */
        fun checkPath(rel: String): String {
            if (rel.isEmpty() || rel.startsWith("/") || '\\' in rel || ':' in rel ||
                rel.split('/').any { it.isEmpty() || it == "." || it == ".." }) {
                throw BundleException("$rel must be a relative path inside the bundle")
            }
            return rel
        }

        fun sha256(f: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            f.inputStream().use { input ->
                val buf = ByteArray(1 shl 20)
                while (true) {
                    val n = input.read(buf)
                    if (n < 0) break
                    md.update(buf, 0, n)
                }
            }
            return md.digest().joinToString("") { "%02x".format(it) }
        }

        fun hashes(o: JSONObject): Map<String, String> =
            o.keys().asSequence().associate { checkPath(it) to o.getString(it) }

        private fun longs(a: JSONArray) = LongArray(a.length()) { a.getLong(it) }

        private fun tensors(a: JSONArray) = (0 until a.length()).map {
            val t = a.getJSONObject(it)
            TensorSpec(t.getString("name"), longs(t.getJSONArray("shape")), t.getString("dtype"))
        }
    }
}
