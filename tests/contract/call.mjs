const response = await fetch('https://your-domain/api/call.php', {
method: 'POST',
headers: {
'Content-Type': 'application/json',
'X-API-Key': 'your-api-key-here'
},
body: JSON.stringify({
model: 'gpt-3.5-turbo',
messages: [
{role: 'user', content: 'Hello!'}
]
})
});
const data = await response.json();
console.log(data);
