// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// A bundle's conformance vectors (docs/bundle.md, "Checking a port"): refused when they belong to another bundle,
// each compared with its tolerance exactly as `qwen-edge conform` compares (qwen_edge/conform.py, compare).
package dev.qwenedge

import org.json.JSONObject

class VectorCheck(val name: String, val ok: Boolean, val measured: String, val criterion: String)

class ConformanceVectors(private val manifest: BundleManifest) {
    private val section: JSONObject = manifest.vectors
        ?: throw BundleException("the bundle has no conformance vectors: export it with --test-vectors")
    val prompt: String = section.getString("prompt")
    val seed: Long = section.getLong("seed")
    private val tensors: JSONObject = section.getJSONObject("tensors")
    /** Vector names in pipeline order: the first failure names the step that is wrong. */
    val names: List<String> = tensors.keys().asSequence().toList()

    init {
        val recorded = section.getString("bundle_id")
        val own = manifest.bundleId()
        if (recorded != own) {
            throw BundleException("these conformance vectors were recorded for another bundle (bundle id " +
                "${recorded.take(12)}..., this bundle is ${own.take(12)}...)")
        }
    }

    /** Check the sha256 of every vector file. */
    fun verify() = manifest.verify(BundleManifest.hashes(section.getJSONObject("files")))

    fun array(name: String): NpyArray {
        val entry = tensors.getJSONObject(name)
        val a = Npy.read(manifest.file(entry.getString("file")))
        val shape = entry.getJSONArray("shape").let { s -> LongArray(s.length()) { s.getLong(it) } }
        if (!a.shape.contentEquals(shape)) throw BundleException("vector $name does not have its listed shape")
        return a
    }

    fun check(name: String, got: NpyArray): VectorCheck =
        compare(name, array(name), got, tensors.getJSONObject(name).getJSONObject("tolerance"))

    companion object {
        const val PSNR_CAP_DB = 200.0

        /** exact: every value equal; max_abs: largest |got - ref|; min_psnr_db: PSNR with peak 255 for uint8, else
         *  the reference's largest |value|. */
        fun compare(name: String, ref: NpyArray, got: NpyArray, tolerance: JSONObject): VectorCheck {
            if (!ref.shape.contentEquals(got.shape)) {
                return VectorCheck(name, false, "shape ${got.shape.toList()}, recorded ${ref.shape.toList()}", "same shape")
            }
            val r = values(ref)
            val g = values(got)
            if (tolerance.optBoolean("exact", false)) {
                val differ = r.indices.count { r[it] != g[it] }
                return VectorCheck(name, differ == 0, if (differ == 0) "identical" else "$differ of ${r.size} values differ", "exact")
            }
            var maxErr = 0.0
            var sumSq = 0.0
            var peak = 0.0
            for (i in r.indices) {
                val e = Math.abs(r[i] - g[i])
                maxErr = maxOf(maxErr, e)
                sumSq += e * e
                peak = maxOf(peak, Math.abs(r[i]))
            }
            if (tolerance.has("max_abs")) {
                val bound = tolerance.getDouble("max_abs")
                return VectorCheck(name, maxErr <= bound, "max |error| %.2e".format(maxErr), "max |error| <= $bound")
            }
            val bound = tolerance.getDouble("min_psnr_db")
            if (ref.bytes != null) peak = 255.0
            val mse = sumSq / maxOf(r.size, 1)
            val psnr = if (mse == 0.0) PSNR_CAP_DB else minOf(PSNR_CAP_DB, 10 * Math.log10(maxOf(peak, 1e-12).let { it * it } / mse))
            return VectorCheck(name, psnr >= bound, "%.1f dB, max |error| %.2e".format(psnr, maxErr), "PSNR >= $bound dB")
        }

        private fun values(a: NpyArray): DoubleArray = when {
            a.floats != null -> DoubleArray(a.floats.size) { a.floats[it].toDouble() }
            a.longs != null -> DoubleArray(a.longs.size) { a.longs[it].toDouble() }
            else -> a.bytes!!.let { b -> DoubleArray(b.size) { (b[it].toInt() and 0xff).toDouble() } }
        }
    }
}
