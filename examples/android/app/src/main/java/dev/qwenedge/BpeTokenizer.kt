// NOT COMPILED BY THIS REPOSITORY'S CI (see examples/android/README.md).
// A byte-level BPE tokenizer over a Hugging Face tokenizer.json, complete for the layout Qwen's tokenizers (and
// qwen-edge's tiny test tokenizers) use:
//   added tokens (matched literally first: <|im_start|>, <|im_end|>, ...) -> NFC normalizer ->
//   Split(regex, Isolated) and/or ByteLevel pre-tokenizer -> bytes mapped to printable characters (GPT-2's
//   table) -> BPE merges by rank -> vocabulary ids -> optional TemplateProcessing post-processor.
// Anything else in a tokenizer.json (another normalizer or model type, byte fallback, dropout) is refused by
// name rather than tokenized differently. The conformance vectors' token_ids check the result id for id; the
// alternative is the tokenizers library itself through JNI (e.g. DJL's ai.djl.huggingface:tokenizers).
package dev.qwenedge

import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.text.Normalizer
import java.util.regex.Pattern

class BpeTokenizer(json: JSONObject) {
    private val model = json.getJSONObject("model")
    private val vocab: Map<String, Long> = model.getJSONObject("vocab").let { v ->
        v.keys().asSequence().associateWith { v.getLong(it) }
    }
    private val ranks: Map<Pair<String, String>, Int> = merges(model.getJSONArray("merges"))
    private val ignoreMerges = model.optBoolean("ignore_merges", false)
    private val unkId: Long? = model.optString("unk_token", "").takeIf { it.isNotEmpty() }?.let { vocab[it] }
    private val added: List<Pair<String, Long>>  // content -> id, longest first (a longer token wins a tie)
    private val nfc: Boolean
    private val split: Pattern?
    private val addPrefixSpace: Boolean
    private val post: JSONObject? = json.optJSONObject("post_processor")
    private val cache = HashMap<String, List<Long>>()

    init {
        require(model.getString("type") == "BPE") { "tokenizer model ${model.getString("type")} is not supported (BPE only)" }
        require(!model.optBoolean("byte_fallback", false)) { "byte_fallback BPE is not supported" }
        require(model.isNull("dropout")) { "BPE dropout is not supported" }
        val tokens = json.optJSONArray("added_tokens") ?: JSONArray()
        added = (0 until tokens.length()).map { tokens.getJSONObject(it) }
            .map { it.getString("content") to it.getLong("id") }
            .sortedByDescending { it.first.length }
        val normalizer = json.optJSONObject("normalizer")
        nfc = when (normalizer?.getString("type")) {
            null -> false
            "NFC" -> true
            else -> throw IllegalArgumentException("normalizer ${normalizer.getString("type")} is not supported")
        }
        var regex: String? = null
        var prefix = false
        for (pre in preTokenizers(json.optJSONObject("pre_tokenizer"))) {
            when (pre.getString("type")) {
                "Split" -> {
                    require(pre.getString("behavior") == "Isolated" && !pre.optBoolean("invert")) {
                        "Split pre-tokenizer: only behavior Isolated, not inverted, is supported"
                    }
                    regex = pre.getJSONObject("pattern").getString("Regex")
                }
                "ByteLevel" -> {
                    prefix = pre.optBoolean("add_prefix_space", false)
                    if (pre.optBoolean("use_regex", true)) regex = GPT2_REGEX
                }
                else -> throw IllegalArgumentException("pre-tokenizer ${pre.getString("type")} is not supported")
            }
        }
        // UNICODE_CHARACTER_CLASS: \s, \w follow Unicode as the Rust regex crate's do (Java's default is ASCII).
        split = regex?.let { Pattern.compile(it, Pattern.UNICODE_CHARACTER_CLASS) }
        addPrefixSpace = prefix
    }

    /** Token ids of [text] (the template-wrapped prompt), as ``tokenizers.Tokenizer.encode(text).ids``. */
    fun encode(text: String): List<Long> {
        val ids = mutableListOf<Long>()
        for ((piece, special) in splitAdded(text)) {
            if (special != null) { ids.add(special); continue }
            var s = if (nfc) Normalizer.normalize(piece, Normalizer.Form.NFC) else piece
            if (addPrefixSpace && !s.startsWith(" ")) s = " $s"
            for (word in preTokenize(s)) ids.addAll(cache.getOrPut(word) { bpe(byteLevel(word)) })
        }
        return postProcess(ids)
    }

    /** Cut [text] at every added token (leftmost match, longest first): (piece, null) or (token, its id). */
    private fun splitAdded(text: String): List<Pair<String, Long?>> {
        val out = mutableListOf<Pair<String, Long?>>()
        var start = 0
        var i = 0
        while (i < text.length) {
            val hit = added.firstOrNull { text.startsWith(it.first, i) }
            if (hit == null) { i++; continue }
            if (i > start) out.add(text.substring(start, i) to null)
            out.add(hit.first to hit.second)
            i += hit.first.length
            start = i
        }
        if (start < text.length) out.add(text.substring(start) to null)
        return out
    }

    /** Split(Isolated): every regex match is a word, and so is every gap between matches. */
    private fun preTokenize(s: String): List<String> {
        val pattern = split ?: return listOf(s)
        val words = mutableListOf<String>()
        val m = pattern.matcher(s)
        var last = 0
        while (m.find()) {
            if (m.start() > last) words.add(s.substring(last, m.start()))
            if (m.end() > m.start()) words.add(m.group())
            last = m.end()
        }
        if (last < s.length) words.add(s.substring(last))
        return words
    }

    /** UTF-8 bytes -> one printable character each (GPT-2's bytes_to_unicode). */
    private fun byteLevel(word: String): List<String> =
        word.toByteArray(Charsets.UTF_8).map { BYTE_CHARS[it.toInt() and 0xff].toString() }

    /** Merge the adjacent pair of lowest rank until none is in the merges; then look every symbol up. */
    private fun bpe(chars: List<String>): List<Long> {
        if (ignoreMerges) vocab[chars.joinToString("")]?.let { return listOf(it) }
        val symbols = chars.toMutableList()
        while (symbols.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (j in 0 until symbols.size - 1) {
                val r = ranks[symbols[j] to symbols[j + 1]] ?: continue
                if (r < bestRank) { bestRank = r; best = j }  // leftmost of the lowest rank
            }
            if (best < 0) break
            symbols[best] = symbols[best] + symbols[best + 1]
            symbols.removeAt(best + 1)
        }
        return symbols.map { vocab[it] ?: unkId ?: throw IllegalStateException("token '$it' is not in the vocabulary") }
    }

    /** TemplateProcessing (special tokens around a single sequence) or nothing (ByteLevel / none). */
    private fun postProcess(ids: List<Long>): List<Long> {
        if (post == null || post.getString("type") != "TemplateProcessing") return ids
        val specials = post.getJSONObject("special_tokens")
        val out = mutableListOf<Long>()
        val single = post.getJSONArray("single")
        for (k in 0 until single.length()) {
            val item = single.getJSONObject(k)
            val special = item.optJSONObject("SpecialToken")
            if (special == null) { out.addAll(ids); continue }
            val tokenIds = specials.getJSONObject(special.getString("id")).getJSONArray("ids")
            for (t in 0 until tokenIds.length()) out.add(tokenIds.getLong(t))
        }
        return out
    }

    companion object {
        /** GPT-2's pre-tokenizer pattern (ByteLevel with use_regex=true). */
        const val GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

        fun fromFile(file: File): BpeTokenizer = BpeTokenizer(JSONObject(file.readText()))

        /** GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256, 257, ... */
        val BYTE_CHARS: CharArray = CharArray(256).also { table ->
            val printable = (33..126) + (161..172) + (174..255)
            var next = 256
            for (b in 0 until 256) table[b] = if (b in printable) b.toChar() else (next++).toChar()
        }

        private fun merges(a: JSONArray): Map<Pair<String, String>, Int> = (0 until a.length()).associate { i ->
            // "a b" (older files) or ["a", "b"] (tokenizers >= 0.20)
            val pair = a.optJSONArray(i)?.let { it.getString(0) to it.getString(1) }
                ?: a.getString(i).split(" ", limit = 2).let { it[0] to it[1] }
            pair to i
        }

        private fun preTokenizers(pre: JSONObject?): List<JSONObject> = when (pre?.getString("type")) {
            null -> emptyList()
            "Sequence" -> pre.getJSONArray("pretokenizers").let { a -> (0 until a.length()).map { a.getJSONObject(it) } }
            else -> listOf(pre)
        }
    }
}
