// Scalar reference for the ternary GEMV/GEMM: plain loops, no SIMD, obviously correct.
// It is the truth every compiled kernel is tested against (see model/ternary/reference.py for the Python API and
// the numpy twin). Built by pybind11 at install time as model.ternary._scalar_ref.
//
// Weights use the `rowmajor4` layout: uint8 W[M][K/4], code(m, k) = (W[m][k/4] >> 2*(k%4)) & 3, weight = code - 1.
//
//   gemm_f32(W, x[N][K], w_scale)           -> y[N][M] = float(sum_k (code - 1) * x)  * w_scale   (double sums)
//   gemm_i8 (W, xq[N][K], x_scale[N], w_scale)
//        -> acc[N][M] = sum_k code * xq - sum_k xq   (int32, exact)
//           y[N][M]   = float(acc) * (w_scale / x_scale[n])   (the ratio in float32 first)

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>

namespace py = pybind11;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

int code_at(const uint8_t* row, int64_t k) { return (row[k / 4] >> (2 * (k % 4))) & 3; }

void check_weights(const carray<uint8_t>& w, int64_t k) {
    if (w.ndim() != 2) throw std::invalid_argument("W must be 2-D uint8 [M, K/4]");
    if (k <= 0 || k % 256 != 0)
        throw std::invalid_argument("K = " + std::to_string(k) + " must be a positive multiple of 256");
    if (w.shape(1) * 4 != k)
        throw std::invalid_argument("W has " + std::to_string(w.shape(1)) + " bytes per row but K = " +
                                    std::to_string(k) + " needs K/4");
}

void check_scale(float s, const char* name) {
    if (!(s > 0.0f) || s == std::numeric_limits<float>::infinity())
        throw std::invalid_argument(std::string(name) + " must be finite and > 0");
}

py::array_t<float> gemm_f32(const carray<uint8_t>& w, const carray<float>& x, float w_scale) {
    if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D float32 [N, K]");
    const int64_t n_tok = x.shape(0), k = x.shape(1), m = w.shape(0);
    check_weights(w, k);
    check_scale(w_scale, "w_scale");
    py::array_t<float> y({n_tok, m});
    auto W = w.unchecked<2>();
    auto X = x.unchecked<2>();
    auto Y = y.mutable_unchecked<2>();
    for (int64_t n = 0; n < n_tok; ++n) {
        for (int64_t r = 0; r < m; ++r) {
            const uint8_t* row = W.data(r, 0);
            double sum = 0.0;
            for (int64_t c = 0; c < k; ++c) sum += double(code_at(row, c) - 1) * double(X(n, c));
            Y(n, r) = float(sum) * w_scale;
        }
    }
    return y;
}

std::tuple<py::array_t<int32_t>, py::array_t<float>> gemm_i8(const carray<uint8_t>& w, const carray<int8_t>& xq,
                                                             const carray<float>& x_scale, float w_scale) {
    if (xq.ndim() != 2) throw std::invalid_argument("xq must be 2-D int8 [N, K]");
    const int64_t n_tok = xq.shape(0), k = xq.shape(1), m = w.shape(0);
    check_weights(w, k);
    check_scale(w_scale, "w_scale");
    if (x_scale.ndim() != 1 || x_scale.shape(0) != n_tok)
        throw std::invalid_argument("x_scale must be 1-D float32 with one scale per token");
    py::array_t<int32_t> acc({n_tok, m});
    py::array_t<float> y({n_tok, m});
    auto W = w.unchecked<2>();
    auto X = xq.unchecked<2>();
    auto S = x_scale.unchecked<1>();
    auto A = acc.mutable_unchecked<2>();
    auto Y = y.mutable_unchecked<2>();
    for (int64_t n = 0; n < n_tok; ++n) {
        check_scale(S(n), "x_scale");
        int64_t xsum = 0;
        for (int64_t c = 0; c < k; ++c) xsum += X(n, c);
        const float ratio = w_scale / S(n);
        for (int64_t r = 0; r < m; ++r) {
            const uint8_t* row = W.data(r, 0);
            int64_t dot = 0;
            for (int64_t c = 0; c < k; ++c) dot += int64_t(code_at(row, c)) * int64_t(X(n, c));
            const int64_t a = dot - xsum;  // |a| <= 127 * K: fits int32 for K < 2^24
            A(n, r) = int32_t(a);
            Y(n, r) = float(int32_t(a)) * ratio;
        }
    }
    return {acc, y};
}

}  // namespace

PYBIND11_MODULE(_scalar_ref, m) {
    m.doc() = "Scalar (plain-loop) reference ternary GEMM for float32 and int8 activations; see reference.py.";
    m.def("gemm_f32", &gemm_f32, py::arg("w").noconvert(), py::arg("x").noconvert(), py::arg("w_scale"),
          "y[N, M] = float(sum_k (code-1)*x) * w_scale, sums in double.");
    m.def("gemm_i8", &gemm_i8, py::arg("w").noconvert(), py::arg("xq").noconvert(), py::arg("x_scale").noconvert(),
          py::arg("w_scale"), "(acc int32 [N, M], y float32 [N, M]) with acc = sum code*xq - sum xq.");
}
