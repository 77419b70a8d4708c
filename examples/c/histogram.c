/*
 * Summary of the numbers on stdin: count, mean, standard deviation (Welford's method), median
 * and a 10-bin histogram between the minimum and the maximum. A plain C program with stdio and
 * libm: built with wasi-libc it runs as a work unit unchanged (stdin is the unit's input, stdout
 * its output); built natively it is its own cross-check.
 *
 *   clang --target=wasm32-wasi --sysroot=/usr -O2 -o histogram.wasm histogram.c -lm
 *   cc -O2 -o histogram histogram.c -lm
 *
 * Exit code 2 when there are no numbers, 3 when there are more than it holds.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_VALUES 1000000
#define BINS 10

static double values[MAX_VALUES];

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void) {
    size_t n = 0;
    double v, mean = 0.0, m2 = 0.0;
    while (scanf("%lf", &v) == 1) {
        if (n == MAX_VALUES) {
            fprintf(stderr, "more than %d numbers\n", MAX_VALUES);
            return 3;
        }
        values[n++] = v;
        double delta = v - mean;
        mean += delta / (double)n;
        m2 += delta * (v - mean);
    }
    if (n == 0) {
        fprintf(stderr, "no numbers on stdin\n");
        return 2;
    }
    qsort(values, n, sizeof values[0], by_value);
    double min = values[0], max = values[n - 1];
    double median = n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2.0;
    unsigned long bins[BINS] = {0};
    for (size_t i = 0; i < n; i++) {
        size_t b = max > min ? (size_t)((values[i] - min) / (max - min) * BINS) : 0;
        bins[b < BINS ? b : BINS - 1]++;
    }
    printf("{\"n\":%zu,\"mean\":%.17g,\"sd\":%.17g,\"median\":%.17g,\"min\":%.17g,\"max\":%.17g,\"bins\":[",
           n, mean, sqrt(m2 / (double)n), median, min, max);
    for (int b = 0; b < BINS; b++) {
        printf(b ? ",%lu" : "%lu", bins[b]);
    }
    printf("]}\n");
    fprintf(stderr, "%zu numbers\n", n);
    return 0;
}
