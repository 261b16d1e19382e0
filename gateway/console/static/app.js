// The console's shell: sign-in, hash routing between pages, and the notice line.

import { call, keys } from './api.js';
import { $ } from './dom.js';
import * as keysPage from './keys.js';
import * as live from './live.js';
import * as models from './models.js';
import * as playground from './playground.js';

const PAGES = { models, keys: { show: keysPage.refresh }, live, playground };
const ADMIN_ONLY = new Set(['models', 'keys', 'live']);
let refreshTimer = null;

function notice(message) {
  const el = $('#notice');
  el.textContent = message || '';
  el.hidden = !message;
}
window.fmgateNotice = notice;

async function route() {
  notice('');
  live.stop();
  clearInterval(refreshTimer);
  let page = location.hash.slice(1) || (keys.admin ? 'models' : 'login');
  if (!(page in PAGES) && page !== 'login') page = 'models';
  if (ADMIN_ONLY.has(page) && !keys.admin) page = 'login';
  for (const s of document.querySelectorAll('.page')) s.hidden = s.id !== `page-${page}`;
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.page === page) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  $('#signout').hidden = !keys.admin && !keys.api;
  document.title = `fmgate console: ${page}`;
  if (page === 'login') {
    $('#login-admin').focus();
    return;
  }
  try {
    await PAGES[page].show();
    if (page === 'keys') refreshTimer = setInterval(() => keysPage.refresh().catch(() => {}), 5000);
  } catch (err) {
    if (err.status === 401 && ADMIN_ONLY.has(page)) {
      keys.admin = '';
      notice('The admin key was refused; sign in again.');
      location.hash = '#login';
    } else {
      notice(err.message);
    }
  }
}

async function signIn(ev) {
  ev.preventDefault();
  const admin = $('#login-admin').value.trim();
  const api = $('#login-api').value.trim();
  keys.api = api;
  if (admin) {
    keys.admin = admin;
    try {
      await call('/admin/keys');
    } catch (err) {
      keys.admin = '';
      notice(err.status === 401 ? `Sign-in failed: ${err.message}` : err.message);
      return;
    }
  }
  $('#login-form').reset();
  const target = admin ? '#models' : '#playground';
  if (location.hash === target) route(); else location.hash = target;
}

function signOut() {
  keys.clear();
  location.hash = '#login';
}

keysPage.init();
playground.init();
$('#login-form').addEventListener('submit', signIn);
$('#signout').addEventListener('click', signOut);
window.addEventListener('hashchange', route);
route();
