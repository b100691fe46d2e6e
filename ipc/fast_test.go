package ipc

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
)

func loadVectors(t testing.TB) map[string][]byte {
	t.Helper()
	b, err := os.ReadFile("testdata/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(b, &vs); err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, v := range vs {
		frame, err := hex.DecodeString(v.Hex)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		out[v.Name] = frame
	}
	return out
}

// Every shared vector decodes by hand exactly as the generic decoder decodes
// it, and encodes by hand to its bytes.
func TestFastVectors(t *testing.T) {
	for name, frame := range loadVectors(t) {
		body := frame[4:]
		var gm, fm Message
		if err := decodeGeneric(body, &gm); err != nil {
			t.Fatalf("%s: generic: %v", name, err)
		}
		if err := decodeFast(body, &fm); err != nil {
			t.Fatalf("%s: fast: %v", name, err)
		}
		if !reflect.DeepEqual(fm, gm) {
			t.Errorf("%s: fast decoded %+v\ngeneric decoded %+v", name, fm, gm)
		}
		again, err := AppendMessage(nil, &gm)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again, frame) {
			t.Errorf("%s: fast encoded\n%x\nwant\n%x", name, again, frame)
		}
		gen, err := encodeGeneric(&gm)
		if err != nil {
			t.Fatal(err)
		}
		if err := sameEncoding(again[4:], gen); err != nil {
			t.Errorf("%s: fast and generic encodings differ: %v", name, err)
		}
	}
}

// The hot frames are decoded without the generic decoder: few allocations
// (a streamed tool call sends calls with nearly every token).
func TestFastDecodeAllocs(t *testing.T) {
	vs := loadVectors(t)
	for name, max := range map[string]float64{"tok": 2, "tok_held": 1, "done": 1, "done_length": 0, "pong": 0, "cancel": 0, "tok_logprobs": 16,
		"tok_call_frags": 6, "done_call_frag": 2, "done_cut_call": 2} {
		body := vs[name][4:]
		var m Message
		allocs := testing.AllocsPerRun(100, func() {
			if err := Decode(body, &m); err != nil {
				t.Fatal(err)
			}
		})
		if allocs > max {
			t.Errorf("%s: %v allocations per decode, want at most %v", name, allocs, max)
		}
	}
}

// A decoded message owns its memory: the reader reuses the frame buffer.
func TestFastDecodeDoesNotAlias(t *testing.T) {
	body := slices.Clone(loadVectors(t)["tok"][4:])
	var m Message
	if err := Decode(body, &m); err != nil {
		t.Fatal(err)
	}
	for i := range body {
		body[i] = 0xff
	}
	if want := (Message{T: TTok, ID: 7, IDs: []int32{504, 11}, Text: "Paris é 🙂"}); !reflect.DeepEqual(m, want) {
		t.Fatalf("after overwriting the body: %+v, want %+v", m, want)
	}
}

var (
	intEdges = []int64{1, -1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, math.MaxInt32, math.MaxUint32, math.MaxUint32 + 1,
		math.MaxInt64, -32, -33, math.MinInt8, math.MinInt8 - 1, math.MinInt16, math.MinInt16 - 1, math.MinInt32, math.MinInt32 - 1, math.MinInt64}
	lenEdges = []int{1, 15, 16, 31, 32, 255, 256, 65535, 65536}
)

// fill sets every field of m to a non-zero value built from i (an int) and n
// (a length). A field type it does not know fails the test: a new field of
// Message needs appendBody and decodeFast to learn it.
func fill(t testing.TB, m *Message, i int64, n int) {
	t.Helper()
	v := reflect.ValueOf(m).Elem()
	for k := 0; k < v.NumField(); k++ {
		f, name := v.Field(k), v.Type().Field(k).Name
		switch f.Interface().(type) {
		case string:
			f.SetString(strings.Repeat("é", n)[:n])
		case int, int64:
			f.SetInt(i)
		case uint64:
			f.SetUint(uint64(i))
		case float64:
			f.SetFloat(float64(i) / 3)
		case bool:
			f.SetBool(true)
		case []int32:
			s := make([]int32, n)
			for j := range s {
				s[j] = int32(i) + int32(j)
			}
			f.Set(reflect.ValueOf(s))
		case []string:
			f.Set(reflect.ValueOf([]string{"", strings.Repeat("x", n)}))
		case map[string]string:
			f.Set(reflect.ValueOf(map[string]string{"python": "3.11", "mlx": strings.Repeat("y", n), "": "z"}))
		case map[int32]float64:
			f.Set(reflect.ValueOf(map[int32]float64{int32(i): 1, 2: -100, 17: 0.5, -5: math.Inf(-1)}))
		case []float64:
			f.Set(reflect.ValueOf([]float64{float64(i) / 7, math.Inf(-1)}))
		case [][]float64:
			f.Set(reflect.ValueOf([][]float64{{float64(i) / 7, -1}, {}}))
		case [][]string:
			f.Set(reflect.ValueOf([][]string{{"", strings.Repeat("w", n)}, {}}))
		case []ChatMessage:
			f.Set(reflect.ValueOf([]ChatMessage{{Role: "user", Content: strings.Repeat("c", n)}, {},
				{Role: "assistant", ToolCalls: []ToolCall{{ID: "call_1", Name: "f", Arguments: strings.Repeat("a", n)}, {}}},
				{Role: "tool", Content: "x", ToolCallID: strings.Repeat("i", n)}}))
		case []ToolCall:
			f.Set(reflect.ValueOf([]ToolCall{{Name: "f", Arguments: strings.Repeat("a", n)}, {ID: "c", Index: int(i), Name: strings.Repeat("n", n)},
				{Index: int(i), Arguments: "x"}, {}}))
		default:
			t.Fatalf("field %s has type %s, which fill (and maybe appendBody and decodeFast) does not know", name, f.Type())
		}
	}
}

// Every field, every int width, string and array length: the hand-rolled
// encoder writes what the generic encoder writes, and both decoders agree.
func TestFastEncodeEveryField(t *testing.T) {
	check := func(m *Message) {
		t.Helper()
		fast := appendBody(nil, m)
		gen, err := encodeGeneric(m)
		if err != nil {
			t.Fatal(err)
		}
		if err := sameEncoding(fast, gen); err != nil {
			t.Fatalf("%+v: %v", m, err)
		}
		if m.T == "" { // encodes (t is not omitempty) but is no frame
			return
		}
		var fm, gm Message
		if err := Decode(fast, &fm); err != nil {
			t.Fatal(err)
		}
		if err := decodeGeneric(fast, &gm); err != nil {
			t.Fatal(err)
		}
		if !sameMessage(fm, gm) {
			t.Fatalf("decoders disagree:\n%+v\n%+v", fm, gm)
		}
	}
	for _, i := range intEdges {
		var m Message
		fill(t, &m, i, 3)
		check(&m)
	}
	for _, n := range lenEdges {
		var m Message
		fill(t, &m, 1000, n)
		check(&m)
	}
	// Fewer than 16 keys (fixmap), and the zero message (only "t").
	check(&Message{T: TGen, ID: 1, Prompt: []int32{1}, Temperature: math.Copysign(0, -1), TopP: math.NaN()})
	check(&Message{})
}

func TestLogitBiasOrder(t *testing.T) {
	m := &Message{T: TGen, LogitBias: map[int32]float64{2: 1, 17: 2, -3: 3, 100: 4, 0: 5}}
	var want []byte
	want = appendMapLen(want, 5)
	for _, k := range []int32{-3, 0, 100, 17, 2} {
		want = appendFloat(appendInt(want, int64(k)), m.LogitBias[k])
	}
	if body := appendBody(nil, m); !bytes.Contains(body, want) {
		t.Fatalf("logit_bias not in decimal order: %x", body)
	}
}

func TestFastDecodeErrors(t *testing.T) {
	head := []byte{0x82, 0xa1, 't', 0xa3, 't', 'o', 'k'} // {t: tok, <one more key>}
	with := func(key string, value ...byte) []byte {
		return append(appendStr(slices.Clone(head), key), value...)
	}
	deep := with("zz", append(bytes.Repeat([]byte{0x91}, 100_000), 0x01)...)
	cases := map[string][]byte{
		"key not a string":         {0x82, 0xa1, 't', 0xa3, 't', 'o', 'k', 0x01, 0x01},
		"key bin":                  {0x82, 0xa1, 't', 0xa3, 't', 'o', 'k', 0xc4, 0x01, 'x', 0x01},
		"text nil":                 with("text", 0xc0),
		"text bin":                 with("text", 0xc4, 0x01, 'x'),
		"text truncated":           with("text", 0xa5, 'a'),
		"text str32 beyond body":   with("text", 0xdb, 0xff, 0xff, 0xff, 0xff),
		"id float":                 with("id", 0xcb, 0, 0, 0, 0, 0, 0, 0, 0),
		"id negative":              with("id", 0xff),
		"id int64 negative":        with("id", 0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0),
		"ptoks beyond int64":       with("ptoks", 0xcf, 0xff, 0, 0, 0, 0, 0, 0, 0),
		"ids not an array":         with("ids", 0x01),
		"ids element too big":      with("ids", 0x91, 0xce, 0x80, 0, 0, 0),
		"ids element str":          with("ids", 0x91, 0xa0),
		"ids array32 beyond body":  with("ids", 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01),
		"ids array16 beyond body":  with("ids", 0xdc, 0x00, 0x03, 0x01, 0x02),
		"stop element int":         with("stop", 0x91, 0x01),
		"special not a bool":       with("special", 0x01),
		"unknown key, truncated":   with("zz", 0x92, 0x01),
		"unknown key, array32":     with("zz", 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01),
		"unknown key, map32":       with("zz", 0xdf, 0xff, 0xff, 0xff, 0xff, 0x01),
		"unknown key, deep nest":   deep,
		"unknown key, 0xc1":        with("zz", 0xc1),
		"map32 beyond body":        {0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, 't', 0xa3, 't', 'o', 'k'},
		"more entries than body":   {0x83, 0xa1, 't', 0xa3, 't', 'o', 'k', 0xa2, 'i', 'd', 0x01},
		"trailing after fallback":  append(with("zz", 0x01), 0x00),
		"t empty":                  {0x81, 0xa1, 't', 0xa0},
		"no t, unknown key":        {0x81, 0xa2, 'z', 'z', 0x01},
		"t nil":                    {0x81, 0xa1, 't', 0xc0},
		"nil body":                 nil,
		"map header only (fixmap)": {0x81},
	}
	for _, frame := range loadVectors(t) {
		body := frame[4:]
		for n := range len(body) {
			cases["prefix of "+hex.EncodeToString(body[:n])] = body[:n]
		}
		cases["trailing after "+hex.EncodeToString(body)] = append(slices.Clone(body), 0xc0)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for name, body := range cases {
		var m Message
		if err := Decode(body, &m); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v, want ErrProtocol", name, err)
		}
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 16<<20 {
		t.Errorf("decoding the bad frames allocated %d MiB", n>>20)
	}
}

// FuzzFastDecode: the hand-rolled decoder either refuses a body or agrees
// with the generic decoder; and for any body the generic decoder takes, the
// hand-rolled encoder writes what the generic encoder writes.
func FuzzFastDecode(f *testing.F) {
	for _, frame := range loadVectors(f) {
		f.Add(frame[4:])
	}
	var m Message
	fill(f, &m, 300, 17)
	f.Add(appendBody(nil, &m))
	f.Add([]byte{0x82, 0xa1, 't', 0xa3, 't', 'o', 'k', 0xa3, 'i', 'd', 's', 0xdc, 0x00, 0x01, 0xd3, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, body []byte) {
		var fm Message
		ferr := Decode(body, &fm)
		if ferr != nil && !errors.Is(ferr, ErrProtocol) {
			t.Fatalf("error %v does not wrap ErrProtocol", ferr)
		}
		// The generic decoder believes array lengths (a few bytes can make it
		// allocate gigabytes): give it only what validate accepts.
		if err := validate(body); err != nil {
			if ferr == nil {
				t.Fatalf("decoded %+v from a body validate refuses: %v", fm, err)
			}
			return
		}
		var gm Message
		gerr := decodeGeneric(body, &gm)
		if ferr == nil {
			if gerr != nil {
				t.Fatalf("fast decoded %+v, generic refused: %v", fm, gerr)
			}
			if !sameMessage(fm, gm) {
				t.Fatalf("fast decoded\n%+v\ngeneric decoded\n%+v", fm, gm)
			}
		}
		if gerr != nil {
			return
		}
		gen, err := encodeGeneric(&gm)
		if err != nil {
			t.Fatal(err)
		}
		if err := sameEncoding(appendBody(nil, &gm), gen); err != nil {
			t.Fatalf("encoding %+v: %v", gm, err)
		}
	})
}

// sameMessage is reflect.DeepEqual, except that floats compare by their bits
// (NaN equals NaN), wherever they are.
func sameMessage(a, b Message) bool { return sameValue(reflect.ValueOf(a), reflect.ValueOf(b)) }

func sameValue(x, y reflect.Value) bool {
	switch x.Kind() {
	case reflect.Float64:
		return math.Float64bits(x.Float()) == math.Float64bits(y.Float())
	case reflect.Struct:
		for i := range x.NumField() {
			if !sameValue(x.Field(i), y.Field(i)) {
				return false
			}
		}
		return true
	case reflect.Slice:
		if x.IsNil() != y.IsNil() || x.Len() != y.Len() {
			return false
		}
		for i := range x.Len() {
			if !sameValue(x.Index(i), y.Index(i)) {
				return false
			}
		}
		return true
	case reflect.Map:
		if x.IsNil() != y.IsNil() || x.Len() != y.Len() {
			return false
		}
		for _, k := range x.MapKeys() {
			if v := y.MapIndex(k); !v.IsValid() || !sameValue(x.MapIndex(k), v) {
				return false
			}
		}
		return true
	}
	return reflect.DeepEqual(x.Interface(), y.Interface())
}

// sameEncoding reports how two msgpack map bodies differ, allowing only the
// entries of a nested map with int keys (logit_bias: the generic encoder
// writes it in random map order) to come in another order.
func sameEncoding(fast, generic []byte) error {
	if bytes.Equal(fast, generic) {
		return nil
	}
	fh, fe, err := entries(fast)
	if err != nil {
		return err
	}
	gh, ge, err := entries(generic)
	if err != nil {
		return err
	}
	if !bytes.Equal(fh, gh) || len(fe) != len(ge) {
		return errors.New("map headers differ")
	}
	for i := range fe {
		if bytes.Equal(fe[i], ge[i]) {
			continue
		}
		if !bytes.HasPrefix(fe[i], appendStr(nil, "logit_bias")) || !bytes.HasPrefix(ge[i], appendStr(nil, "logit_bias")) {
			return errors.New("entries differ")
		}
		lh, le, err := entries(fe[i][len("logit_bias")+1:])
		if err != nil {
			return err
		}
		gh, ge, err := entries(ge[i][len("logit_bias")+1:])
		if err != nil {
			return err
		}
		slices.SortFunc(le, bytes.Compare)
		slices.SortFunc(ge, bytes.Compare)
		if !bytes.Equal(lh, gh) || !slices.EqualFunc(le, ge, bytes.Equal) {
			return errors.New("logit_bias entries differ")
		}
	}
	return nil
}

// entries splits a msgpack map into its header and its key+value byte runs.
func entries(body []byte) (header []byte, kv [][]byte, err error) {
	d := decoder{b: body}
	n := d.mapLen()
	header = body[:d.i]
	for range n {
		start := d.i
		d.skip(0)
		d.skip(0)
		if d.err != nil {
			return nil, nil, d.err
		}
		kv = append(kv, body[start:d.i])
	}
	if d.err == nil && d.rest() != 0 {
		return nil, nil, errors.New("trailing bytes")
	}
	return header, kv, d.err
}
