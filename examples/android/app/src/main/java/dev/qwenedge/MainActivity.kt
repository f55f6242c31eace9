// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// A tiny screen over the engine: a prompt, a button, the image. The bundle is read from the app's external files
// folder (adb push bundle /sdcard/Android/data/dev.qwenedge/files/bundle); generation runs off the UI thread.
package dev.qwenedge

import android.app.Activity
import android.graphics.Bitmap
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.LinearLayout
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors

class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var engine: QwenEdge? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val prompt = EditText(this).apply { setText("a red circle above a blue square") }
        val status = TextView(this)
        val image = ImageView(this).apply { adjustViewBounds = true }
        val button = Button(this).apply { text = "Generate" }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            listOf(prompt, button, status, image).forEach { addView(it) }
        })
        button.setOnClickListener {
            button.isEnabled = false
            status.text = "generating..."
            val text = prompt.text.toString()
            worker.execute {
                val message = try {
                    val qwen = engine ?: QwenEdge(File(getExternalFilesDir(null), "bundle"), lowMemory = true).also { engine = it }
                    val started = System.nanoTime()
                    val out = qwen.generate(text, qwen.noiseFor(seed = 0))
                    val seconds = (System.nanoTime() - started) / 1e9
                    runOnUiThread { image.setImageBitmap(toBitmap(out)) }
                    "%.2f s on %s%s".format(seconds, qwen.backend, if (qwen.truncated) " (prompt truncated)" else "")
                } catch (e: Exception) {
                    "error: ${e.message}"
                }
                runOnUiThread { status.text = message; button.isEnabled = true }
            }
        }
    }

    override fun onDestroy() {
        worker.execute { engine?.close() }
        worker.shutdown()
        super.onDestroy()
    }

    private fun toBitmap(out: GeneratedImage): Bitmap {
        val pixels = IntArray(out.width * out.height) { i ->
            val r = out.rgb[3 * i].toInt() and 0xff
            val g = out.rgb[3 * i + 1].toInt() and 0xff
            val b = out.rgb[3 * i + 2].toInt() and 0xff
            (0xff shl 24) or (r shl 16) or (g shl 8) or b
        }
        return Bitmap.createBitmap(pixels, out.width, out.height, Bitmap.Config.ARGB_8888)
    }
}
