/*
 * A unit written in C against the cf1 guest ABI directly, with no libc: it reads its input with
 * `input_read` and writes, as 16 hexadecimal digits, the 64-bit FNV-1a hash of the input bytes.
 *
 *   clang --target=wasm32 -nostdlib -O2 -mbulk-memory -Wl,--no-entry -o cf1-checksum.wasm cf1-checksum.c
 *
 * `-mbulk-memory` keeps clang from calling an `env.memset` the host would refuse; the memory is
 * exported as `memory` by wasm-ld; `run` is exported by name.
 */
#define CF1(name) __attribute__((import_module("cf1"), import_name(name)))

CF1("input_len") int input_len(void);
CF1("input_read") int input_read(unsigned char *dst, int offset, int len);
CF1("output_write") void output_write(const unsigned char *src, int len);
CF1("fail") void fail(int code, const char *message, int len);

static unsigned char chunk[4096];

__attribute__((export_name("run"))) int run(void) {
    unsigned long long hash = 0xcbf29ce484222325ULL;
    int total = input_len();
    for (int offset = 0; offset < total;) {
        /* input_read checks the requested range against memory, then copies what is left. */
        int got = input_read(chunk, offset, (int)sizeof chunk);
        if (got <= 0) {
            fail(2, "input ended early", 17);
        }
        for (int i = 0; i < got; i++) {
            hash = (hash ^ chunk[i]) * 0x100000001b3ULL;
        }
        offset += got;
    }
    unsigned char out[16];
    for (int i = 0; i < 16; i++) {
        out[i] = "0123456789abcdef"[(hash >> (60 - 4 * i)) & 0xf];
    }
    output_write(out, 16);
    return 0;
}
