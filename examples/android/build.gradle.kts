// NOT BUILT BY THIS REPOSITORY'S CI (see README.md).
plugins {
    id("com.android.application") version "8.5.2" apply false
    id("org.jetbrains.kotlin.android") version "1.9.24" apply false
}
