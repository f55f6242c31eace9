// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// Instrumented test: the app's engine on the device reproduces the bundle's conformance vectors.
//   adb push bundle /sdcard/Android/data/dev.qwenedge/files/bundle     (exported with --test-vectors)
//   ./gradlew connectedCpuDebugAndroidTest     (QNN: connectedQnnDebugAndroidTest
//                                               -Pandroid.testInstrumentationRunnerArguments.npu=true)
// Another bundle folder: -Pandroid.testInstrumentationRunnerArguments.bundle=/path/readable/by/the/app
package dev.qwenedge

import android.util.Log
import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import org.junit.Assert.assertTrue
import org.junit.Test
import org.junit.runner.RunWith
import java.io.File

@RunWith(AndroidJUnit4::class)
class ConformanceTest {
    @Test
    fun bundleReproducesItsConformanceVectors() {
        val args = InstrumentationRegistry.getArguments()
        val context = InstrumentationRegistry.getInstrumentation().targetContext
        val dir = args.getString("bundle")?.let { File(it) } ?: File(context.getExternalFilesDir(null), "bundle")
        QwenEdge(dir, useNpu = args.getString("npu") == "true").use { engine ->
            val vectors = ConformanceVectors(engine.manifest)  // refuses another bundle's vectors
            vectors.verify()
            val seen = LinkedHashMap<String, NpyArray>()
            engine.trace = { name, values -> seen[name] = values }
            // The recorded noise, not noiseFor(seed): java.util.Random is not NumPy's PCG64.
            engine.generate(vectors.prompt, vectors.array("noise").floats!!)
            val results = vectors.names.filter { it != "noise" }.map { name ->
                seen[name]?.let { vectors.check(name, it) } ?: VectorCheck(name, false, "not computed by this port", "-")
            }
            for (r in results) Log.i("QwenEdge", "${r.name}: ${if (r.ok) "ok" else "FAIL"} ${r.measured} (${r.criterion})")
            val failed = results.filter { !it.ok }
            assertTrue("out of tolerance on ${engine.backend}: " +
                failed.joinToString { "${it.name} (${it.measured}; ${it.criterion})" }, failed.isEmpty())
        }
    }
}
