/*
 * Scheduled LoRA: the schedule grammar in JavaScript.
 *
 * A line-by-line port of lib_scheduled_lora/schedule.py and lib_scheduled_lora/tags.py (the
 * reference implementation of docs/schedule-syntax.md), so that the browser can parse and format
 * tags on every mouse move without a server round trip. Both implementations are checked against
 * the same vectors (tests/schedule_vectors.json, generated from the Python core).
 *
 * Plain ES2018, no imports: A1111 loads every javascript/*.js as a classic script (this file then
 * defines the global `ScheduledLoraGrammar`), and Node loads it as a CommonJS module.
 *
 * Where the two languages differ, this file does the Python thing on purpose:
 *  - numbers are printed like Python's repr() (1e-05, 1e+16, 0.3, and 1 for 1.0);
 *  - error messages quote text like Python's repr() and count columns in code points;
 *  - min/max keep Python's argument preference (matters only for the sign of zero);
 *  - the tag regex's \w is Unicode-aware, as in Python 3.
 */
(function (root, factory) {
    'use strict';
    var api = factory();
    if (typeof module === 'object' && module && module.exports) {
        module.exports = api;
    }
    if (root) {
        root.ScheduledLoraGrammar = api;
    }
})(typeof globalThis !== 'undefined' ? globalThis : this, function () {
    'use strict';

    // -- constants (schedule.py) ----------------------------------------------------------------

    // A switch or keyframe at T takes effect at the first evaluation at or after T, up to rounding
    // (6/20 or 10/19 can land a rounding error below a written 0.3 or 0.5).
    var EPSILON = 1e-9;
    var PIECE_SEPARATOR = ':';
    var KEYFRAME_SEPARATORS = ',;';
    var POSITION_MARKS = '@~';
    // ASCII whitespace only, as in the Python core (which avoids str.strip()'s Unicode rules).
    var WHITESPACE = ' \t\n\r\f\v';
    var NUMBER = /^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;
    var NON_FINITE_WORDS = ['nan', 'inf', 'infinity'];

    // -- constants (tags.py) --------------------------------------------------------------------

    // The host's regex <(\w+):([^>]+)>; Python's \w matches Unicode letters and numbers.
    var TAG_SOURCE = '<([\\p{L}\\p{N}_]+):([^>]+)>';
    var KINDS = ['lora', 'lyco', 'loractl'];
    var SCHEDULE_KEYS = ['te', 'unet', 'hr', 'hrte', 'hrunet'];
    var NAMED_KEYS = SCHEDULE_KEYS.concat(['dyn']);
    var MAX_DYN_DIGITS = 9;
    var DIGITS = /^[0-9]+$/;

    // -- small Python-compatible helpers ----------------------------------------------------------

    function contains(chars, ch) {
        return ch.length === 1 && chars.indexOf(ch) >= 0;
    }

    function lstrip(text, chars) {
        var i = 0;
        while (i < text.length && contains(chars, text[i])) i++;
        return text.slice(i);
    }

    function rstrip(text, chars) {
        var j = text.length;
        while (j > 0 && contains(chars, text[j - 1])) j--;
        return text.slice(0, j);
    }

    function strip(text, chars) {
        return rstrip(lstrip(text, chars), chars);
    }

    // Python's min(a, b) / max(a, b): the first argument wins ties (0.0 vs -0.0).
    function pyMin(a, b) {
        return b < a ? b : a;
    }

    function pyMax(a, b) {
        return b > a ? b : a;
    }

    /** Python's repr() of a str, used in error messages ('abc', "it's", '\t'). */
    function pyRepr(text) {
        var quote = text.indexOf("'") >= 0 && text.indexOf('"') < 0 ? '"' : "'";
        var out = quote;
        // Python's str.isprintable(): everything but these categories (ASCII space excepted).
        var unprintable = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u;
        for (var ch of text) {
            var code = ch.codePointAt(0);
            if (ch === quote || ch === '\\') out += '\\' + ch;
            else if (ch === '\t') out += '\\t';
            else if (ch === '\n') out += '\\n';
            else if (ch === '\r') out += '\\r';
            else if (ch !== ' ' && unprintable.test(ch)) out += hexEscape(code);
            else out += ch;
        }
        return out + quote;
    }

    function hexEscape(code) {
        var hex = code.toString(16);
        if (code <= 0xff) return '\\x' + hex.padStart(2, '0');
        if (code <= 0xffff) return '\\u' + hex.padStart(4, '0');
        return '\\U' + hex.padStart(8, '0');
    }

    /** The number of code points in text[0:index] (JS indexes UTF-16 units, Python code points). */
    function codePointIndex(text, index) {
        return Array.from(text.slice(0, index)).length;
    }

    /**
     * Shortest text that reads back as exactly x, as Python's repr(), without a trailing ".0".
     *
     * JavaScript and Python pick the same shortest digits but lay them out differently: Python
     * switches to an exponent below 1e-4 and from 1e16 on, and writes at least two exponent
     * digits with a sign (1e-05, 1.5e+16); JavaScript switches at 1e-7 and 1e21 (1e-7, 1e+21).
     */
    function formatNumber(x) {
        if (x === 0) return '0'; // -0 too: "-0" would only confuse
        var sign = x < 0 ? '-' : '';
        var exp = Math.abs(x).toExponential(); // shortest round-trip digits, e.g. "1.2345e+2"
        var at = exp.indexOf('e');
        var digits = exp.slice(0, at).replace('.', '');
        var exponent = parseInt(exp.slice(at + 1), 10);
        if (exponent < -4 || exponent >= 16) {
            var mantissa = digits.length > 1 ? digits[0] + '.' + digits.slice(1) : digits;
            var e = Math.abs(exponent).toString().padStart(2, '0');
            return sign + mantissa + 'e' + (exponent < 0 ? '-' : '+') + e;
        }
        var text;
        if (exponent < 0) {
            text = '0.' + '0'.repeat(-exponent - 1) + digits;
        } else if (digits.length <= exponent + 1) {
            text = digits + '0'.repeat(exponent + 1 - digits.length);
        } else {
            text = digits.slice(0, exponent + 1) + '.' + digits.slice(exponent + 1);
        }
        return sign + text;
    }

    // -- errors ---------------------------------------------------------------------------------

    /**
     * A malformed tag or schedule: `tag` (whole tag text), `text` (the offending part), `column`
     * (1-based, in code points, inside `tag`) and `problem`. The message matches Python's.
     *
     * `index1` is the 1-based column in UTF-16 units as computed by this port; it is converted
     * here, once, so the scanner can work with plain string indices.
     */
    function ScheduleSyntaxError(tag, text, index1, problem) {
        var column = codePointIndex(tag, index1 - 1) + 1;
        var message = tag + ': ' + pyRepr(text) + ' at column ' + column + ' ' + problem;
        var error = new Error(message);
        Object.setPrototypeOf(error, ScheduleSyntaxError.prototype);
        error.tag = tag;
        error.text = text;
        error.column = column;
        error.problem = problem;
        return error;
    }
    ScheduleSyntaxError.prototype = Object.create(Error.prototype);
    ScheduleSyntaxError.prototype.constructor = ScheduleSyntaxError;
    ScheduleSyntaxError.prototype.name = 'ScheduleSyntaxError';

    function checkFinite(x, what) {
        if (typeof x !== 'number' || !isFinite(x)) {
            throw new Error(what + ' must be a finite number, got ' + x);
        }
        return x;
    }

    // -- model ----------------------------------------------------------------------------------

    /** A multiplier `value` at `pos` (a fraction of the steps, or a step count). Immutable. */
    function Keyframe(value, pos) {
        this.value = checkFinite(value, 'keyframe value');
        this.pos = checkFinite(pos, 'keyframe position');
        Object.freeze(this);
    }

    /** Keyframes sorted by position, active from `start` (the previous piece's switch). */
    function Piece(start, keyframes) {
        this.start = checkFinite(start, 'piece start');
        this.keyframes = Object.freeze(keyframes.slice());
        if (!this.keyframes.length) throw new Error('a piece needs at least one keyframe');
        for (var j = 1; j < this.keyframes.length; j++) {
            if (this.keyframes[j].pos < this.keyframes[j - 1].pos) {
                throw new Error('keyframes must be sorted by position');
            }
        }
        Object.freeze(this);
    }

    Object.defineProperty(Piece.prototype, 'switch', {
        get: function () {
            return this.keyframes[this.keyframes.length - 1].pos;
        },
    });

    /** This piece's multiplier at `pos`: linear inside, flat outside, right-continuous. */
    Piece.prototype.atPosition = function (pos) {
        var kfs = this.keyframes;
        // bisect_right(positions, pos + EPSILON) - 1
        var probe = pos + EPSILON;
        var i = -1;
        while (i + 1 < kfs.length && kfs[i + 1].pos <= probe) i++;
        if (i < 0) return kfs[0].value;
        if (i === kfs.length - 1) return kfs[kfs.length - 1].value;
        var a = kfs[i];
        var b = kfs[i + 1];
        return lerp(a.value, b.value, fraction(pos, a.pos, b.pos));
    };

    Piece.prototype.equals = function (other) {
        if (this.start !== other.start || this.keyframes.length !== other.keyframes.length) return false;
        for (var j = 0; j < this.keyframes.length; j++) {
            var a = this.keyframes[j];
            var b = other.keyframes[j];
            if (a.value !== b.value || a.pos !== b.pos) return false;
        }
        return true;
    };

    /**
     * A whole schedule: pieces that hand over to each other at their switch positions.
     * `inSteps` is true when positions count steps (some position > 1). Immutable.
     */
    function Schedule(pieces, inSteps) {
        if (!pieces.length) throw new Error('a schedule needs at least one piece');
        var expected = 0;
        for (var k = 0; k < pieces.length; k++) {
            if (pieces[k].start !== expected) throw new Error('piece ' + k + ' starts at the wrong position');
            if (k > 0 && pieces[k].switch < pieces[k].start) throw new Error('piece ' + k + ' switches before its start');
            expected = pieces[k].switch;
        }
        if (inSteps !== anyStepPosition(pieces)) {
            throw new Error('inSteps must be true exactly when some position is greater than 1');
        }
        this.pieces = Object.freeze(pieces.slice());
        this.inSteps = inSteps;
        Object.freeze(this);
    }

    /** `value` throughout (what a plain <lora:x:0.8> means). */
    Schedule.constant = function (value) {
        return new Schedule([new Piece(0, [new Keyframe(value, 0)])], false);
    };

    /**
     * A schedule from keyframes as written: [[[value, pos or null], ...], ...]. Only a piece's
     * first keyframe may have no position. Throws Error where the text would be a syntax error.
     */
    Schedule.fromPieces = function (rawPieces) {
        var built = [];
        var start = 0;
        rawPieces.forEach(function (raw, k) {
            if (!raw.length) throw new Error('piece ' + k + ' has no keyframes');
            for (var j = 1; j < raw.length; j++) {
                if (raw[j][1] === null || raw[j][1] === undefined) {
                    throw new Error('piece ' + k + ': only the first keyframe may omit its position');
                }
            }
            var piece = makePiece(start, raw).piece;
            if (k > 0 && piece.switch < start) {
                throw new Error('piece ' + k + ' switches before the previous switch');
            }
            built.push(piece);
            start = piece.switch;
        });
        return new Schedule(built, anyStepPosition(built));
    };

    /** The multiplier at 0-based (possibly fractional) step index `step` of a `steps`-step pass. */
    Schedule.prototype.at = function (step, steps) {
        if (steps < 1) throw new Error('steps must be at least 1, got ' + steps);
        if (this.inSteps) return this.atPosition(step);
        return this.atPosition(steps > 1 ? step / (steps - 1) : 0);
    };

    /** The multiplier at `pos`, in this schedule's own unit (fraction or step count). */
    Schedule.prototype.atPosition = function (pos) {
        var piece = this.pieces[this.pieces.length - 1];
        for (var k = 0; k < this.pieces.length - 1; k++) {
            if (pos < this.pieces[k].switch - EPSILON) {
                piece = this.pieces[k];
                break;
            }
        }
        return piece.atPosition(pos);
    };

    /** One multiplier per step index 0 .. steps - 1. */
    Schedule.prototype.values = function (steps) {
        var out = [];
        for (var i = 0; i < steps; i++) out.push(this.at(i, steps));
        return out;
    };

    Object.defineProperty(Schedule.prototype, 'switchPoints', {
        get: function () {
            return this.pieces.slice(0, -1).map(function (p) {
                return p.switch;
            });
        },
    });

    /** True when the multiplier is the same everywhere (see Schedule._probe_values in Python). */
    Object.defineProperty(Schedule.prototype, 'isConstant', {
        get: function () {
            var probes = this.probeValues();
            return probes.every(function (v) {
                return v === probes[0];
            });
        },
    });

    Schedule.prototype.probeValues = function () {
        var probes = [];
        var last = this.pieces.length - 1;
        this.pieces.forEach(function (piece, k) {
            var lo = k > 0 ? piece.start : -Infinity;
            var hi = k < last ? piece.switch : Infinity;
            if (k > 0 && k < last && !(lo < hi)) return;
            var kfs = piece.keyframes;
            probes.push(k > 0 ? piece.atPosition(lo) : kfs[0].value);
            kfs.forEach(function (kf) {
                if (lo < kf.pos && kf.pos < hi) probes.push(kf.value);
            });
            if (k === last) {
                probes.push(kfs[kfs.length - 1].value);
            } else {
                probes.push(kfs.find(function (kf) {
                    return kf.pos >= hi;
                }).value);
            }
        });
        return probes;
    };

    Schedule.prototype.scaled = function (factor) {
        checkFinite(factor, 'scale factor');
        var pieces = this.pieces.map(function (p) {
            return new Piece(p.start, p.keyframes.map(function (kf) {
                return new Keyframe(kf.value * factor, kf.pos);
            }));
        });
        return new Schedule(pieces, this.inSteps);
    };

    Schedule.prototype.equals = function (other) {
        if (!other || this.inSteps !== other.inSteps || this.pieces.length !== other.pieces.length) return false;
        for (var k = 0; k < this.pieces.length; k++) {
            if (!this.pieces[k].equals(other.pieces[k])) return false;
        }
        return true;
    };

    /** The canonical text: "@" and ",", shortest numbers, positions only where needed. */
    Schedule.prototype.format = function () {
        var last = this.pieces.length - 1;
        return this.pieces.map(function (piece, k) {
            return piece.keyframes.map(function (kf, j) {
                if (j === 0 && mayOmitFirstPosition(piece, k, last)) return formatNumber(kf.value);
                return formatNumber(kf.value) + '@' + formatNumber(kf.pos);
            }).join(',');
        }).join(PIECE_SEPARATOR);
    };

    Schedule.prototype.toString = Schedule.prototype.format;

    /** True when the canonical text ends with "@POS" (a ":" after it would continue it). */
    Object.defineProperty(Schedule.prototype, 'endsWithPosition', {
        get: function () {
            var last = this.pieces.length - 1;
            var final = this.pieces[last];
            return !(final.keyframes.length === 1 && mayOmitFirstPosition(final, last, last));
        },
    });

    /** Keyframes as written: [[[value, pos], ...], ...] (input for Schedule.fromPieces). */
    Schedule.prototype.toRaw = function () {
        return this.pieces.map(function (p) {
            return p.keyframes.map(function (kf) {
                return [kf.value, kf.pos];
            });
        });
    };

    // -- parsing (schedule.py) ------------------------------------------------------------------

    /** Parse a whole schedule such as "0@0.3:1"; errors name `tag` (default: the text). */
    function parseSchedule(text, options) {
        options = options || {};
        var offset = options.offset || 0;
        var tag = options.tag === undefined || options.tag === null ? text : options.tag;
        return parsePieces(splitSpans(text, PIECE_SEPARATOR, offset), tag);
    }

    /** Parse pieces already split on ":"; spans are [text, index]. Left to right, first error wins. */
    function parsePieces(segments, tag) {
        var pieces = [];
        var start = 0;
        for (var k = 0; k < segments.length; k++) {
            var text = segments[k][0];
            var index = segments[k][1];
            if (!strip(text, WHITESPACE)) throw emptyPartError(tag, segments, k, PIECE_SEPARATOR, 'piece');
            var raw = parsePiece(text, index, tag);
            if (k < segments.length - 1 && raw[raw.length - 1].pos === null) {
                throw ScheduleSyntaxError(tag, PIECE_SEPARATOR, index + text.length + 1,
                    'follows a piece that does not end at a position, so there is nothing to switch at');
            }
            var made = makePiece(start, raw.map(function (kf) {
                return [kf.value, kf.pos];
            }));
            if (k > 0 && made.piece.switch < start) {
                var offender = raw[made.switchIndex];
                throw ScheduleSyntaxError(tag, offender.text, offender.index + 1,
                    'lies before the previous switch at ' + formatNumber(start) +
                    ' (switch positions must not decrease)');
            }
            pieces.push(made.piece);
            start = made.piece.switch;
        }
        return new Schedule(pieces, anyStepPosition(pieces));
    }

    /** Whether a ":" after this piece text continues the schedule (its last keyframe has "@"). */
    function pieceEndsWithPosition(text) {
        var parts = text.split(/[,;]/);
        var last = parts[parts.length - 1];
        return last.indexOf('@') >= 0 || last.indexOf('~') >= 0;
    }

    /** Split on any of `separators`, keeping each part's index (plus `offset`): [[text, index]]. */
    function splitSpans(text, separators, offset) {
        offset = offset || 0;
        var spans = [];
        var begin = 0;
        for (var i = 0; i < text.length; i++) {
            if (contains(separators, text[i])) {
                spans.push([text.slice(begin, i), offset + begin]);
                begin = i + 1;
            }
        }
        spans.push([text.slice(begin), offset + begin]);
        return spans;
    }

    function parsePiece(text, index, tag) {
        var parts = splitSpans(text, KEYFRAME_SEPARATORS, index);
        return parts.map(function (span, j) {
            if (!strip(span[0], WHITESPACE)) {
                throw emptyPartError(tag, parts, j, null, 'keyframe', [text, index]);
            }
            return parseKeyframe(span[0], span[1], tag, j === 0);
        });
    }

    function parseKeyframe(part, index, tag, first) {
        var stripped = stripSpan(part, index);
        var text = stripped[0];
        var textIndex = stripped[1];
        var marks = [];
        for (var i = 0; i < part.length; i++) {
            if (contains(POSITION_MARKS, part[i])) marks.push(i);
        }
        if (marks.length > 1) {
            throw ScheduleSyntaxError(tag, text, textIndex + 1, "has more than one position mark ('@')");
        }
        if (!marks.length) {
            var value = parseNumber(part, index, tag);
            if (!first) {
                throw ScheduleSyntaxError(tag, text, textIndex + 1,
                    "has no position; only a piece's first keyframe may leave it out");
            }
            return {value: value, pos: null, text: text, index: textIndex};
        }
        var mark = marks[0];
        var valuePart = part.slice(0, mark);
        var posPart = part.slice(mark + 1);
        if (!strip(valuePart, WHITESPACE)) {
            throw ScheduleSyntaxError(tag, text, textIndex + 1, "has no value before '" + part[mark] + "'");
        }
        var v = parseNumber(valuePart, index, tag);
        if (!strip(posPart, WHITESPACE)) {
            throw ScheduleSyntaxError(tag, text, textIndex + 1, "has no position after '" + part[mark] + "'");
        }
        var pos = parseNumber(posPart, index + mark + 1, tag);
        return {value: v, pos: pos, text: text, index: textIndex};
    }

    function parseNumber(part, index, tag) {
        var stripped = stripSpan(part, index);
        var text = stripped[0];
        var textIndex = stripped[1];
        if (NUMBER.test(text)) {
            var value = Number(text);
            if (isFinite(value)) return value;
            throw ScheduleSyntaxError(tag, text, textIndex + 1, 'is not a finite number'); // e.g. 1e999
        }
        if (NON_FINITE_WORDS.indexOf(lstrip(text.toLowerCase(), '+-')) >= 0) {
            throw ScheduleSyntaxError(tag, text, textIndex + 1, 'is not a finite number');
        }
        throw ScheduleSyntaxError(tag, text, textIndex + 1, 'is not a number');
    }

    /** The error for an empty piece or keyframe, pointing at the separator next to the gap. */
    function emptyPartError(tag, parts, k, separator, noun, source) {
        function separatorAt(i) {
            return separator !== null ? separator : source[0][i - source[1]];
        }
        if (k > 0) {
            var at = parts[k][1] - 1;
            return ScheduleSyntaxError(tag, separatorAt(at), at + 1, 'is not followed by a ' + noun);
        }
        if (parts.length > 1) {
            var at0 = parts[0][1] + parts[0][0].length;
            return ScheduleSyntaxError(tag, separatorAt(at0), at0 + 1, 'is not preceded by a ' + noun);
        }
        return ScheduleSyntaxError(tag, parts[0][0], parts[0][1] + 1, 'is an empty ' + noun);
    }

    /** [part without surrounding whitespace, index where what is left starts]. */
    function stripSpan(part, index) {
        var stripped = lstrip(part, WHITESPACE);
        return [rstrip(stripped, WHITESPACE), index + part.length - stripped.length];
    }

    /** A Piece from [value, pos or null] pairs, and the written index of its switch keyframe. */
    function makePiece(start, raw) {
        var positioned = raw.map(function (kf) {
            return [kf[0], kf[1] === null || kf[1] === undefined ? start : kf[1]];
        });
        var order = positioned.map(function (_, j) {
            return j;
        });
        order.sort(function (a, b) {
            return positioned[a][1] - positioned[b][1]; // stable (ES2019): equal positions keep order
        });
        var piece = new Piece(start, order.map(function (j) {
            return new Keyframe(positioned[j][0], positioned[j][1]);
        }));
        return {piece: piece, switchIndex: order[order.length - 1]};
    }

    function mayOmitFirstPosition(piece, k, last) {
        if (piece.keyframes[0].pos !== piece.start) return false;
        if (piece.keyframes.length === 1) return k === last; // a non-final lone keyframe is its switch
        return k > 0; // ramps in the first piece keep "@0" for readability
    }

    function anyStepPosition(pieces) {
        return pieces.some(function (piece) {
            return piece.keyframes.some(function (kf) {
                return kf.pos > 1;
            });
        });
    }

    /** Where x sits between x0 < x1, clamped to [0, 1]. */
    function fraction(x, x0, x1) {
        var span = x1 - x0;
        if (!isFinite(span)) { // near the float limit: halving is exact and cannot overflow
            x /= 2;
            x0 /= 2;
            x1 /= 2;
            span = x1 - x0;
        }
        return pyMin(1, pyMax(0, (x - x0) / span));
    }

    function lerp(a, b, t) {
        if (a === b) return a; // flat ramps stay exactly constant
        var diff = b - a;
        var value = !isFinite(diff) ? a * (1 - t) + b * t : a + diff * t;
        return pyMin(pyMax(value, pyMin(a, b)), pyMax(a, b));
    }

    // -- tags (tags.py) -------------------------------------------------------------------------

    var ONE = Schedule.constant(1);

    /**
     * One parsed network tag with every fall-back resolved: te/unet (first pass), hrte/hrunet
     * (hires pass), dyn (integer or null) and passthrough ([[key, value], ...], verbatim).
     */
    function NetworkTag(fields) {
        if (KINDS.indexOf(fields.kind) < 0) throw new Error('kind must be one of ' + KINDS.join(', '));
        this.kind = fields.kind;
        this.name = fields.name;
        this.te = fields.te;
        this.unet = fields.unet;
        this.hrte = fields.hrte;
        this.hrunet = fields.hrunet;
        this.dyn = fields.dyn === undefined ? null : fields.dyn;
        this.passthrough = (fields.passthrough || []).map(function (kv) {
            return [kv[0], kv[1]];
        });
        Object.freeze(this);
    }

    /** A tag from the arguments as written; missing ones fall back as the syntax doc says. */
    NetworkTag.create = function (name, args) {
        args = args || {};
        var te = args.te || ONE;
        var unet = args.unet || te;
        var hrte = args.hrte || args.hr || te;
        var hrunet = args.hrunet || args.hr || unet;
        return new NetworkTag({
            kind: args.kind || 'lora', name: name, te: te, unet: unet, hrte: hrte, hrunet: hrunet,
            dyn: args.dyn === undefined ? null : args.dyn, passthrough: args.passthrough || [],
        });
    };

    /**
     * A copy with some of te, unet, hr, hrte, hrunet replaced. A schedule that equalled its
     * fall-back keeps following it (changing te of <lora:x:0.5> changes unet and hires too).
     */
    NetworkTag.prototype.withSchedules = function (changes) {
        Object.keys(changes).forEach(function (key) {
            if (SCHEDULE_KEYS.indexOf(key) < 0) throw new Error('unknown schedule argument: ' + key);
        });
        var te = changes.te || this.te;
        var unet = changes.unet || (this.unet.equals(this.te) ? te : this.unet);
        var hr = changes.hr || null;
        var hrte = changes.hrte || hr || (this.hrte.equals(this.te) ? te : this.hrte);
        var hrunet = changes.hrunet || hr || (this.hrunet.equals(this.unet) ? unet : this.hrunet);
        return new NetworkTag({
            kind: this.kind, name: this.name, te: te, unet: unet, hrte: hrte, hrunet: hrunet,
            dyn: this.dyn, passthrough: this.passthrough,
        });
    };

    NetworkTag.prototype.schedules = function (hires) {
        return hires ? [this.hrte, this.hrunet] : [this.te, this.unet];
    };

    NetworkTag.prototype.equals = function (other) {
        return !!other && this.kind === other.kind && this.name === other.name &&
            this.te.equals(other.te) && this.unet.equals(other.unet) &&
            this.hrte.equals(other.hrte) && this.hrunet.equals(other.hrunet) &&
            this.dyn === other.dyn && JSON.stringify(this.passthrough) === JSON.stringify(other.passthrough);
    };

    /** The canonical tag text, which parses back to an equal tag (see tags.py). */
    NetworkTag.prototype.format = function () {
        var args = [this.name];
        var teText = this.te.format();
        var unetText = this.unet.format();
        if (this.unet.equals(this.te)) {
            args.push(teText);
        } else if (!this.te.endsWithPosition) {
            args.push(teText, unetText);
        } else {
            args.push('te=' + teText, 'unet=' + unetText);
        }
        var hrteDiffers = !this.hrte.equals(this.te);
        var hrunetDiffers = !this.hrunet.equals(this.unet);
        if (hrteDiffers && hrunetDiffers && this.hrte.equals(this.hrunet)) {
            args.push('hr=' + this.hrte.format());
        } else {
            if (hrteDiffers) args.push('hrte=' + this.hrte.format());
            if (hrunetDiffers) args.push('hrunet=' + this.hrunet.format());
        }
        if (this.dyn !== null) args.push('dyn=' + this.dyn);
        this.passthrough.forEach(function (kv) {
            args.push(kv[0] + '=' + kv[1]);
        });
        return '<' + this.kind + ':' + args.join(':') + '>';
    };

    NetworkTag.prototype.toString = NetworkTag.prototype.format;

    /** Parse one whole tag such as "<lora:wday:0@0.3:1>"; throws ScheduleSyntaxError. */
    function parseTag(text) {
        var match = new RegExp('^' + TAG_SOURCE + '$', 'u').exec(text);
        if (!match) {
            throw ScheduleSyntaxError(text, text, 1, 'is not a network tag of the form <lora:NAME:...>');
        }
        var kind = match[1];
        if (KINDS.indexOf(kind) < 0) {
            throw ScheduleSyntaxError(text, kind, 2, 'is not a LoRA tag kind (' + KINDS.join(', ') + ')');
        }
        var segments = splitSpans(match[2], PIECE_SEPARATOR, 1 + kind.length + 1);
        var name = parseName(text, segments[0]);
        return parseArguments(text, kind, name, segments.slice(1));
    }

    function parseName(tag, segment) {
        var name = segment[0];
        var index = segment[1];
        if (!strip(name, WHITESPACE)) {
            throw ScheduleSyntaxError(tag, PIECE_SEPARATOR, index, 'is not followed by a network name');
        }
        if (name.indexOf('=') >= 0) {
            // The host would read it as a named argument and take the next item as the name.
            throw ScheduleSyntaxError(tag, name, index + 1, 'is a named argument where the network name should be');
        }
        return name; // verbatim: the host does not strip names either
    }

    function parseArguments(tag, kind, name, segments) {
        var positional = [];
        var positionalDyn = null;
        var named = {};
        var passthrough = [];
        var i = 0;
        while (i < segments.length) {
            var segment = segments[i][0];
            var index = segments[i][1];
            if (!strip(segment, WHITESPACE)) throw emptyArgumentError(tag, index, i === segments.length - 1);
            var eq = segment.indexOf('=');
            if (eq >= 0) {
                var key = segment.slice(0, eq);
                var value = segment.slice(eq + 1);
                var valueIndex = index + key.length + 1;
                if (NAMED_KEYS.indexOf(key) >= 0) {
                    if (Object.prototype.hasOwnProperty.call(named, key)) {
                        throw ScheduleSyntaxError(tag, segment, index + 1, 'repeats the argument ' + key + '=');
                    }
                    if (!strip(value, WHITESPACE)) {
                        throw ScheduleSyntaxError(tag, segment, index + 1, "has no value after '" + key + "='");
                    }
                    if (key === 'dyn') {
                        named[key] = parseDyn(tag, value, valueIndex, 'dyn');
                        i += 1;
                    } else {
                        var taken = takeSchedule(segments, i, [value, valueIndex]);
                        named[key] = parsePieces(taken.group, tag);
                        i = taken.next;
                    }
                } else if (!strip(key, WHITESPACE)) {
                    throw ScheduleSyntaxError(tag, segment, index + 1, "has no argument name before '='");
                } else {
                    passthrough.push([key, value]); // not ours: kept verbatim for the host
                    i += 1;
                }
                continue;
            }
            var count = positional.length + (positionalDyn !== null ? 1 : 0);
            if (count < 2) {
                var group = takeSchedule(segments, i, [segment, index]);
                positional.push(parsePieces(group.group, tag));
                i = group.next;
            } else if (count === 2) {
                positionalDyn = parseDyn(tag, segment, index, 'the third positional argument, dyn');
                i += 1;
            } else {
                throw ScheduleSyntaxError(tag, strip(segment, WHITESPACE), firstNonSpace(segment, index) + 1,
                    'is a fourth positional argument (the positional arguments are te, unet, dyn)');
            }
        }
        // Named arguments override positional ones, as in the host.
        var has = function (k) {
            return Object.prototype.hasOwnProperty.call(named, k);
        };
        return NetworkTag.create(name, {
            kind: kind,
            te: has('te') ? named.te : positional[0],
            unet: has('unet') ? named.unet : positional[1],
            hr: named.hr, hrte: named.hrte, hrunet: named.hrunet,
            dyn: has('dyn') ? named.dyn : positionalDyn,
            passthrough: passthrough,
        });
    }

    /** The ":"-separated pieces of the schedule starting at segment i: {group, next}. */
    function takeSchedule(segments, i, first) {
        var group = [first];
        i += 1;
        while (i < segments.length && pieceEndsWithPosition(group[group.length - 1][0]) &&
               segments[i][0].indexOf('=') < 0) {
            group.push(segments[i]);
            i += 1;
        }
        return {group: group, next: i};
    }

    function parseDyn(tag, text, index, what) {
        var stripped = strip(text, WHITESPACE);
        var column = firstNonSpace(text, index) + 1;
        if (!DIGITS.test(stripped)) {
            throw ScheduleSyntaxError(tag, stripped, column, 'is not a non-negative integer (' + what + ')');
        }
        if (stripped.length > MAX_DYN_DIGITS) {
            throw ScheduleSyntaxError(tag, stripped, column, 'is too large (' + what + ' is a rank limit)');
        }
        return parseInt(stripped, 10);
    }

    function emptyArgumentError(tag, index, last) {
        var problem = last ? 'is not followed by anything' : 'is followed by an empty argument';
        return ScheduleSyntaxError(tag, PIECE_SEPARATOR, index, problem);
    }

    function firstNonSpace(text, index) {
        return index + text.length - lstrip(text, WHITESPACE).length;
    }

    // -- prompts --------------------------------------------------------------------------------

    /**
     * Every lora/lyco/loractl tag in `prompt`: [{start, end, text, tag, error}], with either the
     * parsed tag or the ScheduleSyntaxError. Never throws. start/end are JS string indices.
     */
    function findTags(prompt) {
        var pattern = new RegExp(TAG_SOURCE, 'gu');
        var matches = [];
        var m;
        while ((m = pattern.exec(prompt)) !== null) {
            if (KINDS.indexOf(m[1]) < 0) continue;
            var found = {start: m.index, end: m.index + m[0].length, text: m[0], tag: null, error: null};
            try {
                found.tag = parseTag(m[0]);
            } catch (error) {
                if (!(error instanceof ScheduleSyntaxError)) throw error;
                found.error = error;
            }
            matches.push(found);
        }
        return matches;
    }

    /** The tags of `prompt` in order; throws the first malformed tag's error. */
    function parsePrompt(prompt) {
        return findTags(prompt).map(function (match) {
            if (match.error) throw match.error;
            return match.tag;
        });
    }

    /** `prompt` with the tag at `match` replaced by `newTag` (a NetworkTag or text). */
    function replaceTag(prompt, match, newTag) {
        if (prompt.slice(match.start, match.end) !== match.text) {
            throw new Error(JSON.stringify(match.text) + ' is not at ' + match.start + ':' + match.end + ' of the prompt');
        }
        return prompt.slice(0, match.start) + String(newTag) + prompt.slice(match.end);
    }

    return {
        EPSILON: EPSILON,
        KINDS: KINDS,
        NAMED_KEYS: NAMED_KEYS,
        SCHEDULE_KEYS: SCHEDULE_KEYS,
        WHITESPACE: WHITESPACE,
        Keyframe: Keyframe,
        Piece: Piece,
        Schedule: Schedule,
        NetworkTag: NetworkTag,
        ScheduleSyntaxError: ScheduleSyntaxError,
        formatNumber: formatNumber,
        pyRepr: pyRepr,
        parseSchedule: parseSchedule,
        parsePieces: parsePieces,
        splitSpans: splitSpans,
        pieceEndsWithPosition: pieceEndsWithPosition,
        parseTag: parseTag,
        findTags: findTags,
        parsePrompt: parsePrompt,
        replaceTag: replaceTag,
    };
});
