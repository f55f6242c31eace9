// NOT BUILT BY THIS REPOSITORY'S CI (see ../README.md).
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val ortVersion: String by project

android {
    namespace = "dev.qwenedge"
    compileSdk = 34

    defaultConfig {
        applicationId = "dev.qwenedge"
        minSdk = 24
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
        ndk { abiFilters += listOf("arm64-v8a") }
    }

    // Two builds of the same source: "cpu" with the standard ONNX Runtime AAR, "qnn" with the AAR that also
    // carries the QNN execution provider (Qualcomm HTP). QwenEdge.kt asks the runtime which providers it has.
    flavorDimensions += "ort"
    productFlavors {
        create("cpu") { dimension = "ort" }
        create("qnn") { dimension = "ort" }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    "cpuImplementation"("com.microsoft.onnxruntime:onnxruntime-android:$ortVersion")
    "qnnImplementation"("com.microsoft.onnxruntime:onnxruntime-android-qnn:$ortVersion")
    androidTestImplementation("androidx.test.ext:junit:1.2.1")
    androidTestImplementation("androidx.test:runner:1.6.2")
}
