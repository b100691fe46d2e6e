package loadgen

import (
	"math"
	"sort"
)

// Summary describes a sample of float64 values.
//
// Percentiles use linear interpolation between the closest ranks (the
// "linear" method of numpy.percentile, Hyndman & Fan type 7): for a sorted
// sample x[0..n-1] the p-th percentile is at fractional index p/100*(n-1).
// StdDev is the population standard deviation (divides by n, numpy's
// default ddof=0). scripts/bench/inprocess.py computes the same numbers, so a
// Summary from either side can be compared directly.
type Summary struct {
	N      int     `json:"n"`
	Mean   float64 `json:"mean"`
	Median float64 `json:"median"`
	P95    float64 `json:"p95"`
	P99    float64 `json:"p99"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	StdDev float64 `json:"stddev"`
}

// Summarize computes a Summary of xs. xs is not modified. An empty sample
// gives the zero Summary.
func Summarize(xs []float64) Summary {
	n := len(xs)
	if n == 0 {
		return Summary{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	mean := sum / float64(n)
	var ss float64
	for _, x := range s {
		d := x - mean
		ss += d * d
	}
	return Summary{
		N:      n,
		Mean:   mean,
		Median: percentileSorted(s, 50),
		P95:    percentileSorted(s, 95),
		P99:    percentileSorted(s, 99),
		Min:    s[0],
		Max:    s[n-1],
		StdDev: math.Sqrt(ss / float64(n)),
	}
}

// Percentile returns the p-th percentile (0..100) of xs with linear
// interpolation (see Summary). It returns 0 for an empty sample.
func Percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return percentileSorted(s, p)
}

func percentileSorted(s []float64, p float64) float64 {
	n := len(s)
	if n == 1 {
		return s[0]
	}
	if p <= 0 {
		return s[0]
	}
	if p >= 100 {
		return s[n-1]
	}
	pos := p / 100 * float64(n-1)
	lo := int(math.Floor(pos))
	hi := lo + 1
	if hi >= n {
		return s[n-1]
	}
	frac := pos - float64(lo)
	return s[lo] + (s[hi]-s[lo])*frac
}
