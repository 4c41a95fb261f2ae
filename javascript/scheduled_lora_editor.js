/*
 * Scheduled LoRA: the schedule editor in the WebUI.
 *
 * One row per network tag of the positive prompt, each with a curve editor (SVG), presets and
 * sliders. The prompt is the single source of truth: every edit rewrites that tag's text in the
 * prompt textarea in canonical form, and every change of the prompt (typing, "Send to", styles)
 * redraws the rows. Nothing here depends on a gradio version: the editor mounts into a plain
 * <div class="scheduled-lora-editor" data-tab="txt2img"> that the extension's script creates,
 * and reads the host's inputs through the selectors in CONFIG. A host adapter overrides them with
 * the container's data-host-config attribute (JSON, merged into CONFIG before the first editor
 * mounts; a null value removes an entry), or by defining window.ScheduledLoraEditorConfig before
 * this file loads.
 *
 * The grammar (parsing, canonical text, per-step values) is javascript/scheduled_lora_grammar.js,
 * which A1111 loads after this file (alphabetical order), so it is looked up lazily.
 */
(function () {
    'use strict';

    // -- configuration -------------------------------------------------------------------------

    var DEFAULT_CONFIG = {
        containerSelector: '.scheduled-lora-editor',
        // Per tab: where the host keeps the inputs the editor reads or writes. A list means
        // "the first one that exists" (A1111 1.10 has both a visible and a hidden hires checkbox).
        tabs: {
            txt2img: {
                prompt: '#txt2img_prompt textarea',
                steps: '#txt2img_steps input[type=number]',
                hires: ['#txt2img_hr-visible-checkbox', '#txt2img_hr-checkbox input[type=checkbox]',
                    '#txt2img_enable_hr input[type=checkbox]', '#txt2img_hr input[type=checkbox]'],
                hiresSteps: '#txt2img_hires_steps input[type=number]',
                sampler: '#txt2img_sampling',
            },
            img2img: {
                prompt: '#img2img_prompt textarea',
                steps: '#img2img_steps input[type=number]',
                hires: null,
                hiresSteps: null,
                sampler: '#img2img_sampling',
            },
        },
        // Samplers that evaluate the model twice per step (2N - 1 evaluations for N steps), and
        // where the extra evaluation of step i sits on the WebUI's grid (placed by log sigma, as
        // the engine does): 'end' at i + 1 (Heun re-evaluates at the next step's sigma; the
        // ancestral DPM2 / DPM++ 2S at eta 1 evaluate at exp((log σ_i + log σ_down) / 2), which
        // is σ_i+1 itself), 'mid' at i + 0.5 (DPM2 and DPM++ SDE: the geometric mean of σ_i and
        // σ_i+1, k-diffusion's sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()).
        secondOrder: {
            'Heun': 'end',
            'DPM2': 'mid',
            'DPM2 a': 'end',
            'DPM++ 2S a': 'end',
            'DPM++ SDE': 'mid',
        },
        pollMs: 400,
        height: {main: 150, hires: 112},
    };

    var CONFIG = mergeConfig(DEFAULT_CONFIG, typeof window !== 'undefined' ? window.ScheduledLoraEditorConfig : null);

    function mergeConfig(base, override) {
        if (!override) return base;
        var out = {};
        Object.keys(base).forEach(function (key) {
            out[key] = base[key];
        });
        Object.keys(override).forEach(function (key) {
            var b = base[key];
            var o = override[key];
            var plain = b && typeof b === 'object' && !Array.isArray(b) && o && typeof o === 'object' && !Array.isArray(o);
            out[key] = plain ? mergeConfig(b, o) : o;
        });
        return out;
    }

    var SVG_NS = 'http://www.w3.org/2000/svg';
    var MARGIN = {left: 34, right: 10, top: 6, bottom: 18};
    var PAD = 7; // px inside the plot so that handles at the edges are not clipped
    var VALUE_STEP = 0.05; // value snapping; Alt gives 0.01
    var HINT = 'Click: add · drag: move (Alt: free) · double-click or Del: remove · J: jump/ramp · ' +
        '[ ]: select · arrows: move · Ctrl+Z: undo';
    var SHORT_HINT = 'Click to add a keyframe, drag to move it, double-click to remove it.';

    function grammar() {
        return window.ScheduledLoraGrammar;
    }

    // -- host access ---------------------------------------------------------------------------

    function appRoot() {
        // A1111 renders into gradio's element (a shadow root in some versions): gradioApp().
        try {
            if (typeof gradioApp === 'function') return gradioApp() || document;
        } catch (e) { /* not ready yet */ }
        return document;
    }

    function queryFirst(selectors) {
        if (!selectors) return null;
        var list = Array.isArray(selectors) ? selectors : [selectors];
        var root = appRoot();
        for (var i = 0; i < list.length; i++) {
            var el = root.querySelector(list[i]) || document.querySelector(list[i]);
            if (el) return el;
        }
        return null;
    }

    function readInt(selectors, fallback) {
        var el = queryFirst(selectors);
        var n = el ? parseInt(el.value, 10) : NaN;
        return isFinite(n) ? n : fallback;
    }

    /** The sampler's name from a <select>, a radio group or gradio's dropdown <input>. */
    function readSampler(selector) {
        var el = queryFirst(selector);
        if (!el) return '';
        if (el.tagName === 'SELECT' || el.tagName === 'INPUT') return el.value;
        var select = el.querySelector('select');
        if (select) return select.value;
        var radio = el.querySelector('input[type=radio]:checked');
        if (radio) return radio.value;
        var input = el.querySelector('input');
        return input ? input.value : '';
    }

    function secondOrderMode(sampler) {
        // Longest name first, so that "DPM2 a" wins over "DPM2"; scheduler suffixes ("Karras")
        // of older versions are ignored.
        var names = Object.keys(CONFIG.secondOrder).sort(function (a, b) {
            return b.length - a.length;
        });
        for (var i = 0; i < names.length; i++) {
            if (sampler === names[i] || sampler.indexOf(names[i] + ' ') === 0) return CONFIG.secondOrder[names[i]];
        }
        return null;
    }

    /** Write the prompt the way a user would, so that gradio (and every listener) sees it. */
    function writePrompt(textarea, text) {
        textarea.value = text;
        if (typeof updateInput === 'function') {
            updateInput(textarea); // A1111's helper: an 'input' event with the right target
        } else {
            textarea.dispatchEvent(new Event('input', {bubbles: true}));
        }
    }

    // -- numbers and snapping ------------------------------------------------------------------

    /** A clean decimal (0.15, not 0.15000000000000002): the text then stays short. */
    function roundTo(x, decimals) {
        return Number(x.toFixed(decimals)) + 0; // + 0 turns -0 into 0
    }

    function snapValue(v, free) {
        return free ? roundTo(v, 2) : roundTo(Math.round(v / VALUE_STEP) * VALUE_STEP, 2);
    }

    /**
     * The fraction to write for "from step index i on" with n steps: the shortest decimal in
     * ((i-1)/(n-1), i/(n-1)], the largest such one. A switch there takes effect exactly at step i
     * (the doc's 0.3 for step 6 of 20), and a ramp keyframe sits as close to step i as the
     * shortest text allows.
     */
    function snapFraction(i, n) {
        if (n <= 1 || i <= 0) return 0;
        if (i >= n - 1) return 1;
        var lo = (i - 1) / (n - 1);
        var hi = i / (n - 1);
        for (var d = 1; d <= 8; d++) {
            var scale = Math.pow(10, d);
            var c = Math.floor(hi * scale + 1e-7) / scale;
            if (c > lo + grammar().EPSILON && c <= hi + grammar().EPSILON) return c;
        }
        return hi;
    }

    // -- geometry: schedule units <-> display -------------------------------------------------

    /**
     * The display maps step indices (u, 0 .. n-1) to x. A fractional schedule's position p sits
     * at u = p * (n - 1); a step-count schedule's position is u itself.
     */
    function Frame(schedule, steps, width, height, values) {
        this.steps = steps;
        this.inSteps = schedule.inSteps;
        this.span = Math.max(steps - 1, 1);
        var posMin = 0;
        var posMax = 0;
        schedule.pieces.forEach(function (p) {
            p.keyframes.forEach(function (kf) {
                posMin = Math.min(posMin, kf.pos);
                posMax = Math.max(posMax, kf.pos);
            });
        });
        this.uMin = this.toU(posMin);
        this.uMax = Math.max(this.span, this.toU(posMax));
        // Values: 0 .. 1 by default, grown (in halves) to fit whatever the schedule reaches.
        var lo = Math.min.apply(null, [0].concat(values));
        var hi = Math.max.apply(null, [1].concat(values));
        this.vMin = lo < 0 ? Math.floor(lo * 2) / 2 : 0;
        this.vMax = hi > 1 ? Math.ceil(hi * 2) / 2 : 1;
        this.width = width;
        this.height = height;
        this.x0 = MARGIN.left + PAD;
        this.x1 = width - MARGIN.right - PAD;
        this.y0 = MARGIN.top + PAD;
        this.y1 = height - MARGIN.bottom - PAD;
    }

    Frame.prototype.toU = function (pos) {
        return this.inSteps ? pos : pos * this.span;
    };
    Frame.prototype.x = function (u) {
        return this.x0 + (u - this.uMin) / ((this.uMax - this.uMin) || 1) * (this.x1 - this.x0);
    };
    Frame.prototype.y = function (v) {
        return this.y1 - (v - this.vMin) / ((this.vMax - this.vMin) || 1) * (this.y1 - this.y0);
    };
    Frame.prototype.uAt = function (px) {
        var u = this.uMin + (px - this.x0) / ((this.x1 - this.x0) || 1) * (this.uMax - this.uMin);
        return Math.min(this.uMax, Math.max(this.uMin, u));
    };
    Frame.prototype.vAt = function (py) {
        return this.vMin + (this.y1 - py) / ((this.y1 - this.y0) || 1) * (this.vMax - this.vMin);
    };
    /** The schedule position for display u: snapped to a step, or free (Alt). */
    Frame.prototype.posAt = function (u, free) {
        if (this.inSteps) return free ? roundTo(u, 2) : Math.round(u);
        if (free) return roundTo(u / this.span, 3);
        return snapFraction(Math.round(u), this.steps);
    };

    // -- schedule edits (pure: raw keyframes in, Schedule out) ---------------------------------
    //
    // A selection is {piece, index}: a keyframe of the schedule's pieces. Every edit rebuilds
    // the schedule from raw keyframes with explicit positions, so piece starts and the text's
    // position omissions are the grammar's business, not ours.

    function rebuild(raw, before, steps) {
        var Schedule = grammar().Schedule;
        raw = raw.filter(function (piece) {
            return piece.length > 0;
        });
        var schedule = Schedule.fromPieces(raw);
        if (before.inSteps && !schedule.inSteps) {
            // Every position is now <= 1, which the text would read as fractions: convert the step
            // counts to the fractions that switch at the same steps.
            schedule = Schedule.fromPieces(raw.map(function (piece) {
                return piece.map(function (kf) {
                    return [kf[0], snapFraction(Math.round(kf[1]), steps)];
                });
            }));
        }
        return schedule;
    }

    function keyframeAt(schedule, sel) {
        var piece = sel && schedule.pieces[sel.piece];
        return piece ? piece.keyframes[sel.index] || null : null;
    }

    function keyframeCount(schedule) {
        return schedule.pieces.reduce(function (n, p) {
            return n + p.keyframes.length;
        }, 0);
    }

    /** The selection closest to (pos, value): used to keep the selection across rebuilds. */
    function nearestSelection(schedule, pos, value) {
        var best = null;
        var bestD = Infinity;
        schedule.pieces.forEach(function (p, k) {
            p.keyframes.forEach(function (kf, j) {
                var d = Math.abs(kf.pos - pos) * 1000 + Math.abs(kf.value - value);
                if (d < bestD) {
                    bestD = d;
                    best = {piece: k, index: j};
                }
            });
        });
        return best;
    }

    /** The piece active at pos (as Schedule.atPosition picks it). */
    function pieceIndexAt(schedule, pos) {
        var pieces = schedule.pieces;
        for (var k = 0; k < pieces.length - 1; k++) {
            if (pos < pieces[k].switch - grammar().EPSILON) return k;
        }
        return pieces.length - 1;
    }

    /** Add a keyframe to the piece active at pos: returns {schedule, sel}. */
    function insertKeyframe(schedule, pos, value, steps) {
        var raw = schedule.toRaw();
        var k = pieceIndexAt(schedule, pos);
        var piece = raw[k];
        var j = 0;
        while (j < piece.length && piece[j][1] <= pos) j++;
        piece.splice(j, 0, [value, pos]);
        var result = rebuild(raw, schedule, steps);
        return {schedule: result, sel: nearestSelection(result, pos, value)};
    }

    /**
     * What moves together when keyframe `sel` moves sideways, and how far it may go.
     *
     * A keyframe at a switch (the end of a piece, or the start of a later one) is half of a
     * jump: all keyframes at that position in the pieces meeting there move together, so that a
     * jump stays a jump. Otherwise the keyframe moves alone between its neighbours.
     */
    function movingSet(schedule, sel, frame) {
        var pieces = schedule.pieces;
        var last = pieces.length - 1;
        var piece = pieces[sel.piece];
        var kf = piece.keyframes[sel.index];
        var S = kf.pos;
        var domainMin = frame.inSteps ? frame.uMin : frame.uMin / frame.span;
        var domainMax = frame.inSteps ? frame.uMax : frame.uMax / frame.span;
        var atSwitch = sel.piece < last && S === piece.switch;
        var atStart = sel.piece > 0 && S === piece.start;
        if (!atSwitch && !atStart) {
            var kfs = piece.keyframes;
            return {
                members: [sel],
                lo: sel.index > 0 ? kfs[sel.index - 1].pos : (sel.piece > 0 ? piece.start : domainMin),
                hi: sel.index < kfs.length - 1 ? kfs[sel.index + 1].pos : domainMax,
            };
        }
        var k0 = sel.piece;
        while (k0 > 0 && pieces[k0].start === S) k0--;
        var k1 = sel.piece;
        while (k1 < last && pieces[k1].switch === S) k1++;
        var members = [];
        var lo = k0 > 0 ? pieces[k0].start : domainMin;
        var hi = domainMax;
        for (var k = k0; k <= k1; k++) {
            pieces[k].keyframes.forEach(function (other, j) {
                if (other.pos === S) members.push({piece: k, index: j});
                else if (other.pos < S) lo = Math.max(lo, other.pos);
                else hi = Math.min(hi, other.pos);
            });
        }
        return {members: members, lo: lo, hi: hi};
    }

    /** Move keyframe `sel` to (pos, value), clamped so that nothing reorders. */
    function moveKeyframe(schedule, sel, pos, value, frame) {
        var set = movingSet(schedule, sel, frame);
        var clamped = Math.min(set.hi, Math.max(set.lo, pos));
        var raw = schedule.toRaw();
        set.members.forEach(function (m) {
            raw[m.piece][m.index][1] = clamped;
        });
        if (value !== null) raw[sel.piece][sel.index][0] = value;
        return {schedule: rebuild(raw, schedule, frame.steps), sel: sel};
    }

    function deleteKeyframe(schedule, sel, steps) {
        if (keyframeCount(schedule) <= 1) return null; // a schedule needs one keyframe
        var raw = schedule.toRaw();
        raw[sel.piece].splice(sel.index, 1);
        var result = rebuild(raw, schedule, steps);
        var kf = keyframeAt(schedule, sel);
        return {schedule: result, sel: nearestSelection(result, kf.pos, kf.value)};
    }

    /**
     * Toggle the segment that ends at the selected keyframe between a ramp and a jump.
     *
     * Ramp -> jump: "hold the previous value, then jump" is a new piece: A@p, B@q becomes
     * A@p,A@q:B. Jump -> ramp merges the two pieces back; where the left side was such a hold it
     * is dropped again (the exact inverse), otherwise the right side starts one step later so
     * that there is something to ramp over.
     */
    function toggleJump(schedule, sel, frame) {
        var raw = schedule.toRaw();
        var pieces = schedule.pieces;
        var piece = pieces[sel.piece];
        var kf = piece.keyframes[sel.index];
        var last = pieces.length - 1;
        var boundary = null; // index of the left piece of a jump to undo
        if (sel.piece > 0 && kf.pos === piece.start) boundary = sel.piece - 1;
        else if (sel.piece < last && kf.pos === piece.switch) boundary = sel.piece;
        if (boundary !== null) {
            var left = raw[boundary];
            var right = raw[boundary + 1];
            var S = left[left.length - 1][1];
            var merged;
            if (left.length >= 2 && left[left.length - 2][0] === left[left.length - 1][0]) {
                merged = left.slice(0, -1).concat(right);
            } else {
                var oneStep = frame.inSteps ? 1 : 1 / frame.span;
                var limit = right.length > 1 ? right[1][1] : (frame.inSteps ? frame.uMax : 1);
                var moved = Math.min(limit, frame.inSteps ? S + oneStep : snapFraction(Math.round(S * frame.span) + 1, frame.steps));
                right = right.slice();
                right[0] = [right[0][0], Math.max(S, moved)];
                merged = left.concat(right);
            }
            raw.splice(boundary, 2, merged);
        } else {
            // The segment ending here; for a piece's first keyframe, the one starting here.
            var j = sel.index > 0 ? sel.index : sel.index + 1;
            var kfs = raw[sel.piece];
            if (j >= kfs.length) return null; // a lone keyframe: no segment to toggle
            var hold = [kfs[j - 1][0], kfs[j][1]];
            raw.splice(sel.piece, 1, kfs.slice(0, j).concat([hold]), kfs.slice(j));
        }
        var result = rebuild(raw, schedule, frame.steps);
        return {schedule: result, sel: nearestSelection(result, kf.pos, kf.value)};
    }

    /** The step index at which position `pos` takes effect (first evaluation at or after it). */
    function stepOf(schedule, pos, steps) {
        var u = schedule.inSteps ? pos : pos * Math.max(steps - 1, 1);
        return Math.max(0, Math.ceil(u - 1e-6));
    }

    /** Before/switch/after of a "B@T:A" schedule; a constant is B = A; null for other curves. */
    function simpleForm(schedule) {
        var p = schedule.pieces;
        if (p.length === 1 && p[0].keyframes.length === 1) {
            return {before: p[0].keyframes[0].value, after: p[0].keyframes[0].value, pos: null};
        }
        if (p.length === 2 && p[0].keyframes.length === 1 && p[1].keyframes.length === 1 &&
            p[1].keyframes[0].pos === p[1].start) {
            return {before: p[0].keyframes[0].value, after: p[1].keyframes[0].value, pos: p[0].switch};
        }
        return null;
    }

    function strengthOf(schedule) {
        var max = -Infinity;
        schedule.pieces.forEach(function (p) {
            p.keyframes.forEach(function (kf) {
                max = Math.max(max, kf.value);
            });
        });
        return max > 0 ? max : 1;
    }

    var PRESETS = [
        {id: 'constant', label: 'Constant', title: 'The same strength at every step',
            make: function (s) { return [[[s, 0]]]; }},
        {id: 'switch30', label: 'On at 30 %', title: 'Base model first: 0 for the first 30 % of steps, then the LoRA',
            make: function (s) { return [[[0, 0.3]], [[s, 0.3]]]; }},
        {id: 'ramp', label: 'Ramp up', title: 'From 0 at the first step to full strength at the last',
            make: function (s) { return [[[0, 0], [s, 1]]]; }},
        {id: 'fade', label: 'Fade out', title: 'From full strength at the first step to 0 at the last',
            make: function (s) { return [[[s, 0], [0, 1]]]; }},
    ];

    // -- DOM helpers ---------------------------------------------------------------------------

    function el(tag, attrs, children) {
        var node = document.createElement(tag);
        Object.keys(attrs || {}).forEach(function (key) {
            if (key === 'text') node.textContent = attrs[key];
            else if (key === 'className') node.className = attrs[key];
            else node.setAttribute(key, attrs[key]);
        });
        (children || []).forEach(function (child) {
            node.appendChild(child);
        });
        return node;
    }

    function fmt(x, digits) {
        return String(roundTo(x, digits === undefined ? 3 : digits));
    }

    // -- one curve (first pass or hires pass) --------------------------------------------------

    /**
     * A curve editor for one schedule of a row: `pass` is 'main' (the UNet schedule; the text
     * encoder follows when it was equal) or 'hires' (the hires pass's UNet schedule).
     */
    function Curve(row, pass) {
        this.row = row;
        this.pass = pass;
        this.sel = null;
        this.drag = null;
        var id = row.tab.idPrefix + '_r' + row.index + '_' + pass;
        this.root = el('div', {className: 'slora-pass', 'data-pass': pass});
        this.label = el('div', {className: 'slora-pass-label'});
        this.svg = document.createElementNS(SVG_NS, 'svg');
        this.svg.setAttribute('class', 'slora-curve');
        this.svg.setAttribute('tabindex', '0');
        this.svg.setAttribute('role', 'application');
        this.svg.setAttribute('aria-describedby', id + '_readout');
        this.svg.setAttribute('aria-label', (pass === 'hires' ? 'Hires pass' : 'First pass') +
            ' schedule of ' + row.displayName() + '. ' + HINT);
        this.readout = el('div', {className: 'slora-readout', id: id + '_readout', 'aria-live': 'polite'});
        this.controls = el('div', {className: 'slora-controls'});
        var plotBox = el('div', {className: 'slora-plot-box'}, [this.svg, this.readout]);
        this.root.appendChild(this.label);
        this.root.appendChild(el('div', {className: 'slora-pass-grid'}, [plotBox, this.controls]));
        this.buildControls(id);
        this.bindPointer();
        this.bindKeys();
    }

    Curve.prototype.schedule = function () {
        var tag = this.row.tag;
        return this.pass === 'hires' ? tag.hrunet : tag.unet;
    };

    Curve.prototype.steps = function () {
        var env = this.row.tab.env;
        return this.pass === 'hires' ? env.hiresSteps : env.steps;
    };

    /** Write a new schedule for this curve into the tag (and so into the prompt). */
    Curve.prototype.set = function (schedule, coalesce) {
        this.lastPress = null; // a press, an edit, a press is not a double-click
        var tag = this.row.tag;
        var changes;
        if (this.pass === 'hires') {
            changes = tag.hrte.equals(tag.hrunet) ? {hr: schedule} : {hrunet: schedule};
        } else {
            changes = tag.te.equals(tag.unet) ? {te: schedule} : {unet: schedule};
        }
        this.row.commit(tag.withSchedules(changes), coalesce);
    };

    Curve.prototype.buildControls = function (id) {
        var self = this;
        var sliderBox = el('div', {className: 'slora-sliders'});
        var side = el('div', {className: 'slora-side'});
        this.controls.appendChild(sliderBox);
        this.controls.appendChild(side);
        var presets = el('div', {className: 'slora-presets', role: 'group', 'aria-label': 'Presets'});
        PRESETS.forEach(function (preset) {
            var button = el('button', {type: 'button', className: 'slora-button', 'data-preset': preset.id,
                title: preset.title, text: preset.label});
            button.addEventListener('click', function () {
                var raw = preset.make(strengthOf(self.schedule()));
                self.sel = null;
                self.set(grammar().Schedule.fromPieces(raw));
            });
            presets.appendChild(button);
        });
        side.appendChild(presets);

        this.sliders = {};
        var specs = [
            {key: 'switch', label: 'Switch at step', min: 0, max: 19, step: 1},
            {key: 'before', label: 'Before switch', min: -1, max: 2, step: 0.05},
            {key: 'after', label: 'After switch', min: -1, max: 2, step: 0.05},
        ];
        specs.forEach(function (spec) {
            var input = el('input', {type: 'range', min: spec.min, max: spec.max, step: spec.step,
                id: id + '_' + spec.key, 'data-slider': spec.key});
            var output = el('output', {className: 'slora-slider-value', for: id + '_' + spec.key});
            var label = el('label', {className: 'slora-slider', for: id + '_' + spec.key},
                [el('span', {text: spec.label}), input, output]);
            input.addEventListener('input', function () {
                self.onSlider(spec.key);
            });
            input.addEventListener('change', function () {
                self.row.endCoalesce();
            });
            self.sliders[spec.key] = {input: input, output: output};
            sliderBox.appendChild(label);
        });
        this.sliderNote = el('div', {className: 'slora-note'});
        sliderBox.appendChild(this.sliderNote);

        var actions = el('div', {className: 'slora-actions'});
        this.jumpButton = el('button', {type: 'button', className: 'slora-button', 'data-action': 'jump',
            title: 'Make the segment ending at the selected keyframe a jump (A@T:B) or a ramp (J)', text: 'Jump ⇄ ramp'});
        this.jumpButton.addEventListener('click', function () {
            self.toggleJump();
        });
        this.deleteButton = el('button', {type: 'button', className: 'slora-button', 'data-action': 'delete',
            title: 'Remove the selected keyframe (Delete)', text: 'Remove'});
        this.deleteButton.addEventListener('click', function () {
            self.deleteSelected();
        });
        actions.appendChild(this.jumpButton);
        actions.appendChild(this.deleteButton);
        if (this.pass === 'hires') {
            this.followButton = el('button', {type: 'button', className: 'slora-button', 'data-action': 'follow',
                title: 'Drop the hires schedule: the hires pass uses the first pass\'s schedules', text: 'Same as first pass'});
            this.followButton.addEventListener('click', function () {
                var tag = self.row.tag;
                self.row.commit(tag.withSchedules({hrte: tag.te, hrunet: tag.unet}));
            });
            actions.appendChild(this.followButton);
        } else {
            // The text encoder: evaluated where the host computes the conditioning (step 0).
            this.teInput = el('input', {type: 'text', className: 'slora-te-input', id: id + '_te', spellcheck: 'false'});
            this.teLink = el('button', {type: 'button', className: 'slora-button', 'data-action': 'te-link',
                title: 'Let the text encoder use the curve\'s schedule', text: '= curve'});
            this.teError = el('div', {className: 'slora-te-error', role: 'alert'});
            this.teInput.addEventListener('change', function () {
                self.onTeText();
            });
            this.teInput.addEventListener('keydown', function (event) {
                if (event.key === 'Enter') self.onTeText();
            });
            this.teLink.addEventListener('click', function () {
                var tag = self.row.tag;
                self.row.commit(tag.withSchedules({te: tag.unet, unet: tag.unet}));
            });
            var teRow = el('div', {className: 'slora-te'}, [
                el('label', {for: id + '_te', text: 'Text encoder'}), this.teInput, this.teLink]);
            side.appendChild(teRow);
            side.appendChild(this.teError);
        }
        side.appendChild(actions);
    };

    Curve.prototype.onTeText = function () {
        var text = this.teInput.value;
        try {
            var te = grammar().parseSchedule(text);
            this.teError.textContent = '';
            var tag = this.row.tag;
            if (!te.equals(tag.te)) this.row.commit(tag.withSchedules({te: te, unet: tag.unet}));
        } catch (error) {
            if (!(error instanceof grammar().ScheduleSyntaxError)) throw error;
            this.teError.textContent = error.message; // not written until it parses
        }
    };

    Curve.prototype.onSlider = function (key) {
        var steps = this.steps();
        var form = this.sliderState;
        var before = key === 'before' ? Number(this.sliders.before.input.value) : form.before;
        var after = key === 'after' ? Number(this.sliders.after.input.value) : form.after;
        var step = key === 'switch' ? Number(this.sliders.switch.input.value) : form.step;
        var schedule = this.schedule();
        // A step-count schedule stays in step counts; a fraction stays portable across step counts.
        var pos = schedule.inSteps && step > 1 ? step : snapFraction(step, steps);
        var raw = [[[roundTo(before, 2), pos]], [[roundTo(after, 2), pos]]];
        this.sel = null;
        this.set(grammar().Schedule.fromPieces(raw), 'slider-' + this.pass + '-' + key);
    };

    Curve.prototype.updateControls = function (schedule, steps) {
        var form = simpleForm(schedule);
        var step;
        if (form && form.pos !== null) step = stepOf(schedule, form.pos, steps);
        else if (form) step = Math.round(0.3 * (steps - 1)); // a constant: offer the usual switch point
        var state = form ? {before: form.before, after: form.after, step: step} : {
            before: schedule.at(0, steps),
            after: schedule.at(steps - 1, steps),
            step: schedule.switchPoints.length ? stepOf(schedule, schedule.switchPoints[0], steps) : Math.round(0.3 * (steps - 1)),
        };
        state.step = Math.min(Math.max(state.step, 0), Math.max(steps - 1, 0));
        this.sliderState = state;
        var s = this.sliders;
        s.switch.input.max = Math.max(steps - 1, 0);
        var lo = Math.min(-1, Math.floor(Math.min(state.before, state.after)));
        var hi = Math.max(2, Math.ceil(Math.max(state.before, state.after)));
        ['before', 'after'].forEach(function (key) {
            s[key].input.min = lo;
            s[key].input.max = hi;
        });
        // Do not fight the user's own slider drag: only move the sliders that are not in use.
        var active = document.activeElement;
        if (active !== s.switch.input) s.switch.input.value = state.step;
        if (active !== s.before.input) s.before.input.value = state.before;
        if (active !== s.after.input) s.after.input.value = state.after;
        s.switch.output.textContent = state.step + ' (' + fmt(steps > 1 ? state.step / (steps - 1) * 100 : 0, 0) + ' %)';
        s.before.output.textContent = fmt(state.before, 2);
        s.after.output.textContent = fmt(state.after, 2);
        this.sliderNote.textContent = form ? '' : 'Custom curve: moving a slider replaces it with "before@switch:after".';
        if (this.teInput) {
            var tag = this.row.tag;
            if (document.activeElement !== this.teInput) this.teInput.value = tag.te.format();
            this.teLink.disabled = tag.te.equals(tag.unet);
            this.teInput.classList.toggle('slora-linked', tag.te.equals(tag.unet));
            this.teInput.title = tag.te.equals(tag.unet) ? 'Follows the curve (same schedule)' : 'Own text-encoder schedule';
        }
        if (this.followButton) {
            var t = this.row.tag;
            this.followButton.disabled = t.hrte.equals(t.te) && t.hrunet.equals(t.unet);
        }
    };

    /** Redraw from the row's tag and the tab's environment. */
    Curve.prototype.render = function () {
        var schedule = this.schedule();
        var steps = this.steps();
        var env = this.row.tab.env;
        if (this.sel && !keyframeAt(schedule, this.sel)) this.sel = null;
        var mode = this.pass === 'hires' ? null : env.secondOrder; // hires: see the label
        var mainDots = [];
        var extraDots = [];
        for (var i = 0; i < steps; i++) mainDots.push({u: i, v: schedule.at(i, steps)});
        if (mode) {
            for (var j = 0; j < steps - 1; j++) {
                var u = mode === 'end' ? j + 1 : j + 0.5;
                extraDots.push({u: u, v: schedule.at(u, steps)});
            }
        }
        var values = [];
        schedule.pieces.forEach(function (p) {
            p.keyframes.forEach(function (kf) {
                values.push(kf.value);
            });
        });
        var width = Math.max(240, Math.round(this.svg.parentNode.clientWidth || this.row.tab.container.clientWidth || 600));
        var height = CONFIG.height[this.pass];
        // While dragging, the axes stay put (the frame of the drag's start), so that the handle
        // stays under the pointer; they grow to fit when the drag ends.
        var frozen = this.drag && this.drag.frame;
        var frame = frozen && frozen.width === width && frozen.inSteps === schedule.inSteps ? frozen
            : new Frame(schedule, steps, width, height, values);
        this.frame = frame;
        this.svg.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
        this.svg.setAttribute('width', width);
        this.svg.setAttribute('height', height);
        // The mapping, for tests and tools that point at a step and a value.
        this.svg.setAttribute('data-steps', steps);
        this.svg.setAttribute('data-frame', JSON.stringify({x0: frame.x0, x1: frame.x1, y0: frame.y0, y1: frame.y1,
            uMin: frame.uMin, uMax: frame.uMax, vMin: frame.vMin, vMax: frame.vMax, width: width, height: height}));
        this.svg.innerHTML = this.markup(schedule, frame, mainDots, extraDots);
        this.updateLabel(schedule, steps, mode, env);
        this.updateReadout(schedule, steps);
        this.updateControls(schedule, steps);
    };

    Curve.prototype.updateLabel = function (schedule, steps, mode, env) {
        var text = (this.pass === 'hires' ? 'Hires pass' : 'First pass') + ' · ' + steps + ' steps';
        if (this.pass === 'main' && env.sampler) {
            text += ' · ' + env.sampler + (mode ? ' (' + (2 * steps - 1) + ' evaluations)' : '');
        }
        if (this.pass === 'hires') {
            var tag = this.row.tag;
            text += tag.hrte.equals(tag.te) && tag.hrunet.equals(tag.unet) ? ' · same as first pass' : ' · own schedule';
        }
        if (schedule.inSteps) text += ' · positions in steps';
        this.label.textContent = text;
    };

    Curve.prototype.updateReadout = function (schedule, steps) {
        var kf = keyframeAt(schedule, this.sel);
        this.jumpButton.disabled = !kf;
        this.deleteButton.disabled = !kf || keyframeCount(schedule) <= 1;
        if (!kf) {
            this.readout.textContent = SHORT_HINT;
            this.readout.title = HINT;
            this.readout.classList.add('slora-hint');
            return;
        }
        this.readout.classList.remove('slora-hint');
        var where = schedule.inSteps ? 'step ' + fmt(kf.pos) :
            'position ' + fmt(kf.pos, 4) + ' (step ' + fmt(kf.pos * Math.max(steps - 1, 1), 1) + ' of ' + steps + ')';
        var piece = schedule.pieces[this.sel.piece];
        var kind = '';
        if (this.sel.piece > 0 && kf.pos === piece.start) kind = ' · jumps in';
        else if (this.sel.piece < schedule.pieces.length - 1 && kf.pos === piece.switch) kind = ' · holds until the jump';
        this.readout.textContent = 'Selected: ' + where + ', multiplier ' + fmt(kf.value) + kind +
            ' (piece ' + (this.sel.piece + 1) + ', keyframe ' + (this.sel.index + 1) + ')';
    };

    /** The SVG content as markup (numbers only, nothing user-typed). */
    Curve.prototype.markup = function (schedule, f, mainDots, extraDots) {
        var parts = [];
        parts.push('<rect class="slora-plot" x="' + MARGIN.left + '" y="' + MARGIN.top + '" width="' +
            (f.width - MARGIN.left - MARGIN.right) + '" height="' + (f.height - MARGIN.top - MARGIN.bottom) + '" rx="3"/>');
        // Value grid: every 0.5 (or 0.25 in the default 0..1 range), 0 and 1 emphasized.
        var vStep = f.vMax - f.vMin > 2 ? 0.5 : 0.25;
        for (var v = f.vMin; v <= f.vMax + 1e-9; v += vStep) {
            var y = f.y(v).toFixed(1);
            var cls = v === 0 ? 'slora-grid slora-zero' : (v === 1 ? 'slora-grid slora-one' : 'slora-grid');
            parts.push('<line class="' + cls + '" x1="' + MARGIN.left + '" x2="' + (f.width - MARGIN.right) + '" y1="' + y + '" y2="' + y + '"/>');
            if (Math.abs(v * 2 - Math.round(v * 2)) < 1e-9) {
                parts.push('<text class="slora-axis" x="' + (MARGIN.left - 5) + '" y="' + y + '" dy="0.32em" text-anchor="end">' + fmt(v, 2) + '</text>');
            }
        }
        // Step grid and labels (a label every k steps so that they never crowd).
        var pxPerStep = (f.x1 - f.x0) / ((f.uMax - f.uMin) || 1);
        var every = [1, 2, 5, 10, 20, 25, 50, 100].find(function (k) {
            return k * pxPerStep >= 28;
        }) || 100;
        for (var u = Math.ceil(f.uMin); u <= f.uMax + 1e-9; u++) {
            var x = f.x(u).toFixed(1);
            if (pxPerStep >= 6) {
                parts.push('<line class="slora-grid slora-step" x1="' + x + '" x2="' + x + '" y1="' + MARGIN.top + '" y2="' + (f.height - MARGIN.bottom) + '"/>');
            }
            if (u % every === 0) {
                parts.push('<text class="slora-axis" x="' + x + '" y="' + (f.height - 5) + '" text-anchor="middle">' + u + '</text>');
            }
        }
        parts.push('<path class="slora-line" d="' + this.pathData(schedule, f) + '"/>');
        mainDots.forEach(function (d) {
            parts.push('<circle class="slora-dot" data-step="' + d.u + '" data-value="' + d.v + '" cx="' + f.x(d.u).toFixed(1) + '" cy="' + f.y(d.v).toFixed(1) + '" r="2.6"><title>step ' + d.u + ': ' + fmt(d.v, 4) + '</title></circle>');
        });
        // Extra evaluations of second-order samplers: rings (around the next step's dot where the
        // sampler evaluates there again; between the steps for DPM2 / DPM++ SDE midpoints).
        extraDots.forEach(function (d) {
            parts.push('<circle class="slora-dot-extra" data-step="' + d.u + '" data-value="' + d.v + '" cx="' + f.x(d.u).toFixed(1) + '" cy="' + f.y(d.v).toFixed(1) + '" r="' + (d.u % 1 ? 2.4 : 4.2) + '"><title>extra evaluation at step ' + fmt(d.u, 1) + ': ' + fmt(d.v, 4) + '</title></circle>');
        });
        if (this.pass === 'main' && !this.row.tag.te.equals(this.row.tag.unet)) {
            // The text encoder is evaluated at the conditioning (step 0): a diamond there.
            var te = this.row.tag.te.at(0, f.steps);
            var tx = f.x(0);
            var ty = f.y(te);
            parts.push('<path class="slora-te-mark" d="M' + (tx - 5) + ' ' + ty + 'l5 -5l5 5l-5 5z"><title>text encoder: ' + fmt(te, 4) + '</title></path>');
        }
        var sel = this.sel;
        var hits = [];
        schedule.pieces.forEach(function (piece, k) {
            piece.keyframes.forEach(function (kf, j) {
                var selected = sel && sel.piece === k && sel.index === j;
                var at = '" data-piece="' + k + '" data-index="' + j + '" cx="' + f.x(f.toU(kf.pos)).toFixed(1) +
                    '" cy="' + f.y(kf.value).toFixed(1);
                parts.push('<circle class="slora-handle' + (selected ? ' slora-selected' : '') + at + '" data-pos="' +
                    kf.pos + '" data-value="' + kf.value + '" r="' + (selected ? 7 : 5.5) + '"/>');
                // A larger invisible target on top: a keyframe is easy to grab even when its
                // position (0.3) sits a little off the step line the user aims at (6/19).
                hits.push('<circle class="slora-hit' + at + '" r="10"/>');
            });
        });
        return parts.concat(hits).join('');
    };

    /** The curve as a polyline: each piece over the interval where it is active, jumps vertical. */
    Curve.prototype.pathData = function (schedule, f) {
        var dMin = f.inSteps ? f.uMin : f.uMin / f.span;
        var dMax = f.inSteps ? f.uMax : f.uMax / f.span;
        var pieces = schedule.pieces;
        var last = pieces.length - 1;
        var points = [];
        pieces.forEach(function (piece, k) {
            var lo = k > 0 ? piece.start : dMin;
            var hi = k < last ? piece.switch : dMax;
            if (k > 0 && k < last && !(lo < hi)) return; // never active
            points.push([lo, piece.atPosition(lo)]);
            piece.keyframes.forEach(function (kf) {
                if (lo < kf.pos && kf.pos < hi) points.push([kf.pos, kf.value]);
            });
            var end = k < last ? piece.keyframes.find(function (kf) {
                return kf.pos >= hi;
            }).value : piece.atPosition(hi);
            points.push([hi, end]);
        });
        return points.map(function (p, i) {
            return (i ? 'L' : 'M') + f.x(f.toU(p[0])).toFixed(1) + ' ' + f.y(p[1]).toFixed(1);
        }).join('');
    };

    Curve.prototype.pointerToSvg = function (event) {
        var rect = this.svg.getBoundingClientRect();
        var f = this.frame;
        return {
            x: (event.clientX - rect.left) * (f.width / (rect.width || f.width)),
            y: (event.clientY - rect.top) * (f.height / (rect.height || f.height)),
        };
    };

    Curve.prototype.bindPointer = function () {
        var self = this;
        var svg = this.svg;
        svg.addEventListener('pointerdown', function (event) {
            if (event.button !== 0 || !self.row.tag) return;
            event.preventDefault();
            svg.focus({preventScroll: true});
            var target = event.target;
            var schedule = self.schedule();
            var p = self.pointerToSvg(event);
            var f = self.frame;
            // One click-and-drag (add, then place) is one undo step.
            var dragId = 'drag-' + Date.now() + '-' + Math.random();
            if (target.classList && target.classList.contains('slora-hit')) {
                var pressed = {piece: Number(target.getAttribute('data-piece')), index: Number(target.getAttribute('data-index'))};
                // A double-click removes the keyframe. Detected here rather than with 'dblclick':
                // the SVG is redrawn on every press, and a press whose element disappeared gets
                // no click events.
                var last = self.lastPress;
                var now = Date.now();
                self.lastPress = {sel: pressed, time: now};
                if (last && now - last.time < 450 && last.sel.piece === pressed.piece && last.sel.index === pressed.index) {
                    self.lastPress = null;
                    self.sel = pressed;
                    self.deleteSelected();
                    return;
                }
                self.sel = pressed;
            } else if (p.x >= MARGIN.left && p.x <= f.width - MARGIN.right && p.y >= MARGIN.top && p.y <= f.height - MARGIN.bottom) {
                var free = event.altKey;
                var added = insertKeyframe(schedule, f.posAt(f.uAt(p.x), free), snapValue(f.vAt(p.y), free), f.steps);
                self.sel = added.sel;
                self.lastPress = null;
                schedule = added.schedule;
                self.set(schedule, dragId);
            } else {
                return;
            }
            self.drag = {pointer: event.pointerId, base: schedule, frame: f, id: dragId};
            svg.setPointerCapture(event.pointerId);
            self.row.renderAll();
        });
        svg.addEventListener('pointermove', function (event) {
            var drag = self.drag;
            if (!drag || drag.pointer !== event.pointerId) return;
            var f = drag.frame;
            var p = self.pointerToSvg(event);
            var free = event.altKey;
            var moved = moveKeyframe(drag.base, self.sel, f.posAt(f.uAt(p.x), free), snapValue(f.vAt(p.y), free), f);
            self.set(moved.schedule, drag.id);
        });
        var end = function (event) {
            if (!self.drag || self.drag.pointer !== event.pointerId) return;
            self.drag = null;
            self.row.endCoalesce();
            self.row.renderAll();
        };
        svg.addEventListener('pointerup', end);
        svg.addEventListener('pointercancel', end);

    };

    Curve.prototype.bindKeys = function () {
        var self = this;
        this.svg.addEventListener('focus', function () {
            if (!self.sel && self.row.tag) {
                self.sel = {piece: 0, index: 0};
                self.row.renderAll();
            }
        });
        this.svg.addEventListener('keydown', function (event) {
            if (!self.row.tag || event.ctrlKey || event.metaKey) return; // Ctrl+Z: the row handles it
            var handled = self.onKey(event);
            if (handled) {
                event.preventDefault();
                event.stopPropagation();
            }
        });
    };

    Curve.prototype.onKey = function (event) {
        var schedule = this.schedule();
        var key = event.key;
        if (key === '[' || key === ']') {
            var flat = [];
            schedule.pieces.forEach(function (p, k) {
                p.keyframes.forEach(function (_, j) {
                    flat.push({piece: k, index: j});
                });
            });
            var at = this.sel ? flat.findIndex(function (s) {
                return s.piece === this.sel.piece && s.index === this.sel.index;
            }, this) : -1;
            at = (at + (key === ']' ? 1 : flat.length - 1)) % flat.length;
            this.sel = flat[at];
            this.row.renderAll();
            return true;
        }
        if (key === 'Escape') {
            this.sel = null;
            this.row.renderAll();
            return true;
        }
        var kf = keyframeAt(schedule, this.sel);
        if (!kf) return false;
        if (key === 'Delete' || key === 'Backspace') {
            this.deleteSelected();
            return true;
        }
        if (key === 'j' || key === 'J') {
            this.toggleJump();
            return true;
        }
        var f = this.frame;
        var fine = event.shiftKey || event.altKey;
        if (key === 'ArrowUp' || key === 'ArrowDown') {
            var dv = (key === 'ArrowUp' ? 1 : -1) * (fine ? 0.01 : VALUE_STEP);
            this.set(moveKeyframe(schedule, this.sel, kf.pos, roundTo(kf.value + dv, 2), f).schedule, 'keys');
            return true;
        }
        if (key === 'ArrowLeft' || key === 'ArrowRight') {
            var dir = key === 'ArrowRight' ? 1 : -1;
            var pos;
            if (fine) {
                pos = schedule.inSteps ? roundTo(kf.pos + dir * 0.1, 2) : roundTo(kf.pos + dir * 0.01, 3);
            } else {
                var step = Math.round(f.toU(kf.pos)) + dir;
                pos = f.posAt(step, false);
            }
            this.set(moveKeyframe(schedule, this.sel, pos, null, f).schedule, 'keys');
            return true;
        }
        return false;
    };

    Curve.prototype.deleteSelected = function () {
        var schedule = this.schedule();
        if (!keyframeAt(schedule, this.sel)) return;
        var result = deleteKeyframe(schedule, this.sel, this.steps());
        if (!result) return;
        this.sel = result.sel;
        this.row.endCoalesce();
        this.set(result.schedule);
    };

    Curve.prototype.toggleJump = function () {
        var schedule = this.schedule();
        if (!keyframeAt(schedule, this.sel)) return;
        var result = toggleJump(schedule, this.sel, this.frame);
        if (!result) return;
        this.sel = result.sel;
        this.row.endCoalesce();
        this.set(result.schedule);
    };

    // -- one row per network tag ---------------------------------------------------------------

    function Row(tab, index) {
        this.tab = tab;
        this.index = index;
        this.match = null;
        this.tag = null;
        this.undo = [];
        this.redo = [];
        this.coalesce = null;
        this.root = el('div', {className: 'slora-row', 'data-index': index});
        this.name = el('span', {className: 'slora-name'});
        this.text = el('code', {className: 'slora-tag-text'});
        this.root.appendChild(el('div', {className: 'slora-row-head'}, [this.name, this.text]));
        this.error = el('div', {className: 'slora-error', role: 'alert'});
        this.root.appendChild(this.error);
        this.body = el('div', {className: 'slora-body'});
        this.root.appendChild(this.body);
        this.curves = null; // built on the first valid tag (needs its name for labels)
        var self = this;
        this.root.addEventListener('keydown', function (event) {
            self.onKey(event);
        });
    }

    Row.prototype.displayName = function () {
        return this.tag ? this.tag.name : (this.match ? this.match.text : '');
    };

    Row.prototype.update = function (match) {
        this.match = match;
        this.tag = match.tag;
        var kindMatch = /^<([^:>]+):([^:>]*)/.exec(match.text);
        this.name.textContent = this.tag ? this.tag.name : (kindMatch ? kindMatch[2] : match.text);
        this.root.setAttribute('data-name', this.name.textContent);
        this.text.textContent = match.text;
        this.root.classList.toggle('slora-has-error', !!match.error);
        if (match.error) {
            // A tag that does not parse is shown, never rewritten.
            this.error.textContent = match.error.message;
            this.error.hidden = false;
            this.body.hidden = true;
            return;
        }
        this.error.textContent = '';
        this.error.hidden = true;
        this.body.hidden = false;
        if (!this.curves) {
            this.curves = {main: new Curve(this, 'main'), hires: new Curve(this, 'hires')};
            this.body.appendChild(this.curves.main.root);
            this.body.appendChild(this.curves.hires.root);
        }
        this.renderAll();
    };

    Row.prototype.renderAll = function () {
        if (!this.tag || !this.curves) return;
        var hires = this.tab.env.hires;
        this.curves.main.render();
        this.curves.hires.root.hidden = !hires;
        if (hires) this.curves.hires.render();
    };

    /**
     * Write `tag` into the prompt in canonical form, remembering the previous text for undo.
     * Edits with the same `coalesce` key (one drag, one slider move) make one undo step.
     */
    Row.prototype.commit = function (tag, coalesce) {
        var text = tag.format();
        var before = this.match.text;
        if (text === before) {
            this.renderAll();
            return;
        }
        if (!coalesce || coalesce !== this.coalesce) {
            this.undo.push(before);
            if (this.undo.length > 200) this.undo.shift();
            this.redo = [];
        }
        this.coalesce = coalesce || null;
        this.tab.replaceTag(this.index, text);
    };

    Row.prototype.endCoalesce = function () {
        this.coalesce = null;
    };

    Row.prototype.onKey = function (event) {
        if (!(event.ctrlKey || event.metaKey)) return;
        if (event.target && event.target.tagName === 'INPUT' && event.target.type === 'text') return; // its own undo
        var key = event.key.toLowerCase();
        var redo = key === 'y' || (key === 'z' && event.shiftKey);
        if (key !== 'z' && key !== 'y') return;
        event.preventDefault();
        event.stopPropagation();
        var from = redo ? this.redo : this.undo;
        var to = redo ? this.undo : this.redo;
        if (!from.length || !this.match) return;
        to.push(this.match.text);
        this.coalesce = null;
        this.tab.replaceTag(this.index, from.pop());
    };

    Row.prototype.destroy = function () {
        this.root.remove();
    };

    // -- one editor per tab ---------------------------------------------------------------------

    function TabEditor(container) {
        this.container = container;
        this.tabName = container.getAttribute('data-tab') || (container.id || '').replace(/^scheduled_lora_editor_/, '') || 'txt2img';
        this.selectors = CONFIG.tabs[this.tabName] || CONFIG.tabs.txt2img;
        this.idPrefix = 'scheduled_lora_' + this.tabName;
        this.rows = [];
        this.lastPrompt = null;
        this.lastEnvKey = null;
        this.env = {steps: 20, hires: false, hiresSteps: 20, sampler: '', secondOrder: null};
        container.innerHTML = '';
        container.classList.add('slora-mounted');
        this.status = el('div', {className: 'slora-status'});
        this.rowsBox = el('div', {className: 'slora-rows'});
        container.appendChild(this.status);
        container.appendChild(this.rowsBox);
        var self = this;
        if (typeof ResizeObserver === 'function') {
            var lastWidth = 0;
            new ResizeObserver(function () {
                var width = container.clientWidth;
                if (width && Math.abs(width - lastWidth) > 2) {
                    lastWidth = width;
                    self.rows.forEach(function (row) {
                        row.renderAll();
                    });
                }
            }).observe(container);
        }
    }

    TabEditor.prototype.readEnv = function () {
        var s = this.selectors;
        var steps = Math.max(1, readInt(s.steps, 20));
        var hiresBox = queryFirst(s.hires);
        var hiresSteps = readInt(s.hiresSteps, 0);
        var sampler = readSampler(s.sampler);
        return {
            steps: steps,
            hires: !!(hiresBox && hiresBox.checked),
            // Hires steps 0 means "as many as the first pass" in A1111.
            hiresSteps: hiresSteps > 0 ? hiresSteps : steps,
            sampler: sampler,
            secondOrder: secondOrderMode(sampler),
        };
    };

    /** Re-read the prompt and the inputs; redraw when something changed (or when forced). */
    TabEditor.prototype.sync = function (force) {
        var textarea = queryFirst(this.selectors.prompt);
        if (!textarea) {
            this.status.textContent = 'Scheduled LoRA: the prompt box (' + this.selectors.prompt + ') was not found.';
            return;
        }
        var prompt = textarea.value;
        var env = this.readEnv();
        var envKey = JSON.stringify(env);
        if (!force && prompt === this.lastPrompt && envKey === this.lastEnvKey) return;
        this.lastPrompt = prompt;
        this.lastEnvKey = envKey;
        this.env = env;
        var matches = grammar().findTags(prompt);
        // Rows follow tags by their order in the prompt: renaming or editing a tag keeps its row
        // (and its undo history), adding or removing tags adds or removes rows at the end.
        while (this.rows.length > matches.length) this.rows.pop().destroy();
        for (var i = 0; i < matches.length; i++) {
            if (!this.rows[i]) {
                this.rows[i] = new Row(this, i);
                this.rowsBox.appendChild(this.rows[i].root);
            }
            this.rows[i].update(matches[i]);
        }
        this.status.textContent = matches.length ? '' :
            'No LoRA in the prompt. Add one, e.g. <lora:name:0@0.3:1>, and its schedule appears here.';
        this.status.hidden = !!matches.length;
    };

    /** Replace the index-th tag of the prompt by `text` and redraw. */
    TabEditor.prototype.replaceTag = function (index, text) {
        var textarea = queryFirst(this.selectors.prompt);
        if (!textarea) return false;
        var prompt = textarea.value;
        var match = grammar().findTags(prompt)[index];
        if (!match) return false;
        writePrompt(textarea, grammar().replaceTag(prompt, match, text));
        this.sync(true);
        return true;
    };

    // -- mounting -------------------------------------------------------------------------------

    var editors = [];
    var booted = false;
    var pending = false;

    var hostConfigApplied = false;

    /** The host adapter's selectors and sampler table, from the first container that has them. */
    function applyHostConfig(containers) {
        if (hostConfigApplied) return;
        for (var i = 0; i < containers.length; i++) {
            var text = containers[i].getAttribute('data-host-config');
            if (!text) continue;
            hostConfigApplied = true;
            try {
                CONFIG = mergeConfig(CONFIG, JSON.parse(text));
                if (window.ScheduledLoraEditor) window.ScheduledLoraEditor.config = CONFIG;
            } catch (e) {
                console.warn('Scheduled LoRA: ignoring an unreadable data-host-config', e);
            }
            return;
        }
    }

    function scan() {
        if (!grammar()) return; // loaded after this file in A1111: try again on the next tick
        var containers = appRoot().querySelectorAll(CONFIG.containerSelector);
        applyHostConfig(containers);
        Array.prototype.forEach.call(containers, function (container) {
            if (container.__scheduledLoraEditor) return;
            var editor = new TabEditor(container);
            container.__scheduledLoraEditor = editor;
            editors.push(editor);
        });
        editors = editors.filter(function (editor) {
            return editor.container.isConnected;
        });
        editors.forEach(function (editor) {
            editor.sync(false);
        });
    }

    function scheduleScan() {
        if (pending) return;
        pending = true;
        var run = function () {
            pending = false;
            scan();
        };
        if (typeof requestAnimationFrame === 'function') requestAnimationFrame(run);
        else setTimeout(run, 0);
    }

    function boot() {
        if (booted) return;
        booted = true;
        // Typing, sliders and checkboxes fire input/change events: react at once. Changes made
        // by code without events ("Send to", paste from infotext) are caught by the poll.
        document.addEventListener('input', scheduleScan, true);
        document.addEventListener('change', scheduleScan, true);
        setInterval(scan, CONFIG.pollMs);
        scan();
    }

    if (typeof window !== 'undefined') {
        window.ScheduledLoraEditor = {
            config: CONFIG,
            scan: scan,
            editors: function () {
                return editors.slice();
            },
            // exposed for tests and adapters
            snapFraction: snapFraction,
            simpleForm: simpleForm,
        };
        if (typeof onUiLoaded === 'function') onUiLoaded(boot);
        if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
        else setTimeout(boot, 0);
    }
})();
