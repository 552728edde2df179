package bench

import (
	"math"
	"testing"
)

func TestMedianQuantile(t *testing.T) {
	for _, tc := range []struct {
		xs             []float64
		median, q1, q3 float64
	}{
		{[]float64{3, 1, 2}, 2, 1.5, 2.5},
		{[]float64{4, 1, 3, 2}, 2.5, 1.75, 3.25},
		{[]float64{7}, 7, 7, 7},
	} {
		orig := append([]float64(nil), tc.xs...)
		if m := Median(tc.xs); m != tc.median {
			t.Errorf("Median(%v) = %v, want %v", orig, m, tc.median)
		}
		if q := Quantile(tc.xs, 0.25); q != tc.q1 {
			t.Errorf("Quantile(%v, 0.25) = %v, want %v", orig, q, tc.q1)
		}
		if q := Quantile(tc.xs, 0.75); q != tc.q3 {
			t.Errorf("Quantile(%v, 0.75) = %v, want %v", orig, q, tc.q3)
		}
		for i := range orig {
			if tc.xs[i] != orig[i] {
				t.Fatalf("%v was modified to %v", orig, tc.xs)
			}
		}
	}
	if !math.IsNaN(Median(nil)) || !math.IsNaN(Quantile(nil, 0.5)) {
		t.Error("no values must give NaN")
	}
}
