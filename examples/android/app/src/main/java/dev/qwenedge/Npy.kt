// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// Reads the .npy files of a bundle's conformance vectors: NumPy format 1.0/2.0, little-endian, C order,
// float32 ('<f4'), int64 ('<i8') or uint8 ('|u1').
package dev.qwenedge

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** An array read from a .npy file: its shape and exactly one of the three value arrays. */
class NpyArray(val shape: LongArray, val floats: FloatArray? = null, val longs: LongArray? = null, val bytes: ByteArray? = null) {
    val size: Int get() = shape.fold(1L) { a, b -> a * b }.toInt()
}

object Npy {
    private val MAGIC = byteArrayOf(0x93.toByte(), 0x4E, 0x55, 0x4D, 0x50, 0x59)  // \x93NUMPY

    fun read(file: File): NpyArray {
        val buf = ByteBuffer.wrap(file.readBytes()).order(ByteOrder.LITTLE_ENDIAN)
        val magic = ByteArray(6).also { buf.get(it) }
        require(magic.contentEquals(MAGIC)) { "${file.name} is not a .npy file" }
        val major = buf.get().toInt()
        buf.get()  // minor version
        val headerLen = if (major == 1) buf.short.toInt() and 0xffff else buf.int
        val header = ByteArray(headerLen).also { buf.get(it) }.toString(Charsets.ISO_8859_1)
        val descr = Regex("'descr':\\s*'([^']+)'").find(header)?.groupValues?.get(1)
            ?: throw IllegalArgumentException("${file.name}: no descr in the header")
        require(!header.contains("'fortran_order': True")) { "${file.name}: Fortran order is not supported" }
        val dims = Regex("'shape':\\s*\\(([^)]*)\\)").find(header)?.groupValues?.get(1)
            ?: throw IllegalArgumentException("${file.name}: no shape in the header")
        val shape = dims.split(',').map { it.trim() }.filter { it.isNotEmpty() }.map { it.toLong() }.toLongArray()
        val n = shape.fold(1L) { a, b -> a * b }.toInt()
        return when (descr) {
            "<f4" -> NpyArray(shape, floats = FloatArray(n).also { buf.asFloatBuffer().get(it) })
            "<i8" -> NpyArray(shape, longs = LongArray(n).also { buf.asLongBuffer().get(it) })
            "|u1" -> NpyArray(shape, bytes = ByteArray(n).also { buf.get(it) })
            else -> throw IllegalArgumentException("${file.name}: dtype $descr is not supported")
        }
    }
}
