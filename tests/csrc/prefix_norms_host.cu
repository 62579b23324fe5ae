// Host harness for csrc/prefix_norms.cu: built by nvcc into a CPU executable (tests/test_csrc.py) and
// run without a GPU. It checks the __host__ __device__ pieces the kernel is made of: the fp16/bf16
// widening and the lane split / segment accumulation, against float64 references.
// Exit status 0 = all passed; failures are printed.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/prefix_norms.cu"

static int failures = 0;

static void check(bool ok, const char* what, double got, double want) {
    if (!ok) {
        ++failures;
        std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    }
}

static void check_same_float(float got, float want, const char* what) {
    unsigned int a, b;
    std::memcpy(&a, &got, 4);
    std::memcpy(&b, &want, 4);
    check(a == b, what, got, want);
}

static void test_widening() {
    struct Case { unsigned short bits; float want; };
    const Case half_cases[] = {
        {0x3C00, 1.0f},         {0xC000, -2.0f},          {0x7BFF, 65504.0f},
        {0x0001, 0x1p-24f},     {0x03FF, 1023 * 0x1p-24f}, {0x0400, 0x1p-14f},
        {0x3555, 0.333251953125f}, {0x0000, 0.0f},        {0x8000, -0.0f},
        {0x7C00, INFINITY},     {0xFC00, -INFINITY},
    };
    for (const Case& c : half_cases) check_same_float(mrl::half_bits_to_float(c.bits), c.want, "half");
    check(std::isnan(mrl::half_bits_to_float(0x7E00)), "half nan", 0, NAN);

    const Case bf16_cases[] = {
        {0x3F80, 1.0f}, {0xC2F7, -123.5f}, {0x0001, 0x1p-133f}, {0x7F80, INFINITY}, {0x8000, -0.0f},
    };
    for (const Case& c : bf16_cases) check_same_float(mrl::bf16_bits_to_float(c.bits), c.want, "bf16");

    // Every finite half: exact agreement with the value the bits encode.
    for (unsigned int h = 0; h < 0x10000u; ++h) {
        const unsigned int e = (h >> 10) & 0x1f, m = h & 0x3ff;
        if (e == 31) continue;
        double v = e ? std::ldexp(1.0 + m / 1024.0, (int)e - 15) : std::ldexp((double)m, -24);
        if (h & 0x8000) v = -v;
        const float got = mrl::half_bits_to_float((unsigned short)h);
        if (got != (float)v) { check(false, "half sweep", got, v); break; }
    }
}

// Deterministic values in [-2, 2): a small LCG keeps the harness free of <random>.
static float next_value(unsigned int& s) {
    s = s * 1664525u + 1013904223u;
    return (float)((s >> 8) & 0xffff) / 16384.0f - 2.0f;
}

static void test_lane_split() {
    const int D = 70;
    std::vector<float> row(D);
    unsigned int s = 7;
    for (float& v : row) v = next_value(s);
    // Segment bounds that cross lane boundaries in every way: empty-ish, shorter than a warp, longer.
    const int bounds[][2] = {{0, 1}, {3, 17}, {17, 70}, {0, 70}, {31, 33}, {69, 70}};
    for (const auto& b : bounds) {
        double want = 0;
        for (int c = b[0]; c < b[1]; ++c) want += (double)row[c] * row[c];
        for (int lanes : {1, 7, 32}) {
            double got = 0;
            for (int lane = 0; lane < lanes; ++lane)
                got += mrl::lane_sumsq<mrl::F32>(row.data(), b[0], b[1], lane, lanes);
            check(std::fabs(got - want) <= 1e-5 * want, "lane split", got, want);
        }
    }
}

// The caller's dims (17, 3, 70) arrive sorted (3, 17, 70) with out_col (1, 0, 2).
template <class L, class Store>
static void test_row(Store store, double tol, const char* what) {
    const int D = 70, dims[] = {3, 17, 70}, out_col[] = {1, 0, 2}, caller_dims[] = {17, 3, 70};
    std::vector<typename L::T> row(D);
    unsigned int s = 12345;
    for (auto& v : row) v = store(next_value(s));
    float out[3] = {NAN, NAN, NAN};
    mrl::row_prefix_norms<L>(row.data(), dims, out_col, 3, 32, out);
    for (int k = 0; k < 3; ++k) {
        double want = 0;
        for (int c = 0; c < caller_dims[k]; ++c) {
            const double v = L::load(row[c]);
            want += v * v;
        }
        want = std::sqrt(want);
        check(std::fabs(out[k] - want) <= tol * want, what, out[k], want);
    }
}

int main() {
    test_widening();
    test_lane_split();
    test_row<mrl::F32>([](float v) { return v; }, 1e-6, "row f32");
    // Storing the top 16 bits truncates to bf16; the reference widens the same bits, so the
    // tolerance covers only fp32 accumulation.
    test_row<mrl::BF16>([](float v) {
        unsigned int u;
        std::memcpy(&u, &v, 4);
        return (unsigned short)(u >> 16);
    }, 1e-6, "row bf16");
    // Encode as half by truncating the mantissa (values under 2^-14 flush to zero).
    test_row<mrl::F16>([](float v) {
        const unsigned short sign = v < 0 ? 0x8000 : 0;
        const float a = std::fabs(v) < 0x1p-14f ? 0.0f : std::fabs(v);
        int e;
        const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
        if (a == 0.0f) return sign;
        const unsigned short man = (unsigned short)((m * 2 - 1) * 1024);  // truncate to 10 bits
        return (unsigned short)(sign | ((e - 1 + 15) << 10) | man);
    }, 1e-6, "row f16");

    if (failures) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("prefix_norms host harness: all checks passed\n");
    return 0;
}
